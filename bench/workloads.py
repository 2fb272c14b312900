"""What `dlserve bench` sends each model, taken from its held-out data: runner-ready parts
for the in-process ceiling, and HTTP request bodies exactly as a client sends them.

Each model's registry entry names its `Workload` here (`workload=Ref(...)`), so the bench
itself never names a model.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.timing import median_seconds
from dlserve.preprocess.ratings import by_user
from dlserve.preprocess.text import tokenize
from dlserve.registry import DataSource
from readers.mnist import load_mnist
from readers.movielens import load_movielens
from readers.sst2 import load_sst2

LONG_TOKENS = 200
# (route, JSON body) pairs, each request carrying `items` items, taken in order from the
# held-out data (or, for the recommender, one u1.base user per request: a request is one
# user by design).
Request = tuple[str, bytes]
MakePart = Callable[[int], Any]  # n → n items, as the runner's run_batch takes them
Mixed = tuple[str, str, bytes]  # path, content type, body
JSON = "application/json"


@dataclass(frozen=True)
class BatchInput:
    """A file for `dlserve score`, written by the bench, and the job options it needs
    (scoring.adapters.Job's fields: {"k": 10} is `--k 10`)."""

    path: Path
    layout: str  # how the report names it: "Parquet, pixels as lists of 784 uint8"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    # (runner, data) → make_part, for the in-process ceiling
    parts: Callable[[Any, DataSource], MakePart]
    # (data, items per request, how many requests, encoding) → request bodies
    requests: Callable[[DataSource, int, int, str], list[Request]]
    multi_item: bool = True  # False: a request carries one item by design
    encodings: tuple[str, ...] = ("json",)  # how multi-item requests may be encoded
    # model-specific in-process measurements, merged into the results by name
    extra: Callable[[Any, DataSource], dict[str, Any]] | None = None
    p50_target_ms: float = 5.0  # one client, one item per request
    # dlserve's throughput against the lean hand-written peer (one item, 64 clients), and
    # the most its p99 may be, as a multiple of the lean peer's (None: no p99 target)
    lean_target: tuple[float, float | None] = (1.2, None)
    overload: bool = False  # the model whose queue the "beyond capacity" run fills
    # (data, how many) → (path, content type, body) of every route, valid and invalid:
    # the soak's mixed traffic
    mixed: Callable[[DataSource, int], list[Mixed]] | None = None
    # (data, folder, rows) → batch-scoring inputs of about that many rows (the first is the
    # one the targets are judged on), for the bench's batch section; their items are those
    # of `parts`, so the engine compares with the ceiling
    batch: Callable[[DataSource, Path, int], list[BatchInput]] | None = None
    batch_rows: int = 10_000  # rows the batch section scores (a tenth of them for the RSS)
    # (data, items) → one valid request of that many large items: the soak's bursts, which
    # push a worker's memory to its peak (None: the model's items are all small)
    burst: Callable[[DataSource, int], Mixed] | None = None


def cycle(items: list[Any]) -> MakePart:
    """n items, repeating `items` as often as needed."""
    return lambda n: [items[i % len(items)] for i in range(n)]


def digits_parts(runner: Any, source: DataSource) -> MakePart:
    images = load_mnist(source.folder, "test").images.astype(np.float32)
    return lambda n: np.resize(images, (n, *images.shape[1:]))


def digits_requests(
    source: DataSource, items: int, count: int, encoding: str = "json"
) -> list[Request]:
    """Images as JSON arrays of 0-255 integers, or in the compact `images_base64` form."""
    images = load_mnist(source.folder, "test").images  # uint8 [N, 28, 28]
    picks = np.resize(np.arange(len(images)), count * items).reshape(count, items)
    if encoding == "base64":
        return [
            (
                "/digits/predict",
                orjson.dumps(
                    {
                        "images_base64": [
                            base64.b64encode(images[i].tobytes()).decode() for i in rows
                        ]
                    }
                ),
            )
            for rows in picks
        ]
    return [("/digits/predict", orjson.dumps({"images": images[rows].tolist()})) for rows in picks]


def sentiment_texts(runner: Any, source: DataSource) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of SST-2 dev sentences (short), and of long texts made by joining dev
    sentences until each reaches LONG_TOKENS tokens (a long review)."""
    short = runner.vocab.encode_corpus(load_sst2(source.folder, "dev").texts)
    long, current = [], []
    for seq in short:
        current += seq
        if len(current) >= LONG_TOKENS:
            long.append(current[:LONG_TOKENS])
            current = []
    return short, long


def bucketing(
    runner: Any,
    short: list[list[int]],
    long: list[list[int]],
    *,
    batch: int = 64,
    long_share: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Sentiment batches of mostly short texts with a few long ones: length buckets against
    padding every text to the batch's longest."""
    rng = np.random.default_rng(seed)
    n_long = max(1, round(batch * long_share))
    seqs = [short[i] for i in rng.choice(len(short), batch - n_long)]
    seqs += [long[i] for i in rng.choice(len(long), n_long)]
    bucketed = median_seconds(lambda: runner.predict(seqs))
    padded = median_seconds(lambda: runner.predict(seqs, bucketed=False))
    lengths = [len(s) for s in seqs]
    return {
        "batch": batch,
        "long_texts": n_long,
        "tokens_real": sum(lengths),
        "tokens_padded": max(lengths) * batch,
        "ms_bucketed": round(bucketed * 1e3, 2),
        "ms_padded": round(padded * 1e3, 2),
        "speedup": round(padded / bucketed, 2),
    }


def sentiment_bucketing(runner: Any, source: DataSource) -> dict[str, Any]:
    return {"bucketing": bucketing(runner, *sentiment_texts(runner, source))}


def sentiment_long_texts(source: DataSource) -> list[str]:
    """SST-2 dev sentences joined until each text has LONG_TOKENS tokens or more: the raw
    text of sentiment_texts' long reviews, as a client sends it."""
    out, current, tokens = [], [], 0
    for text in load_sst2(source.folder, "dev").texts:
        current.append(text)
        tokens += len(tokenize(text))
        if tokens >= LONG_TOKENS:
            out.append(" ".join(current))
            current, tokens = [], 0
    return out


def sentiment_burst(source: DataSource, items: int) -> Mixed:
    """One request of `items` long texts (repeated as needed)."""
    texts = sentiment_long_texts(source)
    return (
        "/sentiment/predict",
        JSON,
        orjson.dumps({"texts": [texts[i % len(texts)] for i in range(items)]}),
    )


def sentiment_requests(
    source: DataSource, items: int, count: int, encoding: str = "json"
) -> list[Request]:
    texts = load_sst2(source.folder, "dev").texts
    return [
        (
            "/sentiment/predict",
            orjson.dumps({"texts": [texts[(i * items + j) % len(texts)] for j in range(items)]}),
        )
        for i in range(count)
    ]


def recommender_parts(runner: Any, source: DataSource) -> MakePart:
    """One user per item: every training user, with all of their ratings."""
    users = by_user(load_movielens(source.folder).train, runner.catalogue)
    return cycle(list(users.values()))


def recommender_requests(
    source: DataSource, items: int, count: int, encoding: str = "json"
) -> list[Request]:
    train = load_movielens(source.folder).train
    out = []
    for user in np.unique(train.users)[:count]:
        mine = train.users == user
        ratings = [
            {"movie_id": int(m), "rating": int(r)}
            for m, r in zip(train.movies[mine], train.levels[mine], strict=True)
        ]
        out.append(("/recommender/recommend", orjson.dumps({"ratings": ratings, "k": 10})))
    return out


def _infer(model: str, inputs: list[dict[str, Any]], **parameters: Any) -> Mixed:
    body: dict[str, Any] = {"inputs": inputs}
    if parameters:
        body["parameters"] = parameters
    return (f"/v2/models/{model}/infer", JSON, orjson.dumps(body))


def digits_mixed(source: DataSource, count: int) -> list[Mixed]:
    """Per image: arrays, base64, a PNG file, protocol tensors; and four bad requests."""
    from io import BytesIO

    from PIL import Image

    images = load_mnist(source.folder, "test").images[:count]
    out: list[Mixed] = []
    for image in images:
        png = BytesIO()
        Image.fromarray(image).save(png, "PNG")
        out += [
            ("/digits/predict", JSON, orjson.dumps({"images": [image.tolist()]})),
            (
                "/digits/predict",
                JSON,
                orjson.dumps({"images_base64": [base64.b64encode(image.tobytes()).decode()]}),
            ),
            ("/digits/predict_image", "image/png", png.getvalue()),
            _infer(
                "digits",
                [
                    {
                        "name": "pixels",
                        "shape": [1, 28, 28],
                        "datatype": "UINT8",
                        "data": image.ravel().tolist(),
                    }
                ],
            ),
        ]
    return out + [
        ("/digits/predict", JSON, b"{}"),
        ("/digits/predict", JSON, orjson.dumps({"images": [[[0] * 27] * 28]})),
        ("/digits/predict_image", "image/png", b"not an image"),
        _infer("digits", [{"name": "pixels", "shape": [1], "datatype": "INT64", "data": [0]}]),
    ]


def sentiment_mixed(source: DataSource, count: int) -> list[Mixed]:
    texts = load_sst2(source.folder, "dev").texts[:count]
    out = [("/sentiment/predict", JSON, orjson.dumps({"texts": [t]})) for t in texts]
    out += [
        _infer("sentiment", [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}])
        for t in texts
    ]
    return out + [
        ("/sentiment/predict", JSON, orjson.dumps({"texts": ["   "]})),
        ("/sentiment/predict", JSON, b"not json"),
    ]


def recommender_mixed(source: DataSource, count: int) -> list[Mixed]:
    out: list[Mixed] = []
    for path, body in recommender_requests(source, 1, count):
        ratings = orjson.loads(body)["ratings"]
        out += [
            (path, JSON, body),
            (
                "/recommender/predict",
                JSON,
                orjson.dumps({"ratings": ratings, "movie_ids": [1, 2, 3]}),
            ),
            _infer(
                "recommender",
                [
                    {
                        "name": "rated_movie_ids",
                        "shape": [len(ratings)],
                        "datatype": "INT64",
                        "data": [r["movie_id"] for r in ratings],
                    },
                    {
                        "name": "ratings",
                        "shape": [len(ratings)],
                        "datatype": "FP32",
                        "data": [r["rating"] for r in ratings],
                    },
                ],
                k=10,
            ),
        ]
    return out + [
        (
            "/recommender/recommend",
            JSON,
            orjson.dumps({"ratings": [{"movie_id": 999999, "rating": 5}], "k": 10}),
        ),
        ("/recommender/recommend", JSON, orjson.dumps({"ratings": [], "k": 0})),
    ]


def digits_batch(source: DataSource, folder: Path, rows: int) -> list[BatchInput]:
    """Parquet files of raw pixels (`id`, `pixels`), MNIST test images repeated: 784 uint8
    values per row as pyarrow writes a NumPy array (a fixed-size list), and the same pixels
    as 784 bytes (a binary column: a tenth of the decoding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = load_mnist(source.folder, "test").images.reshape(-1, 784)
    pixels = np.resize(images, (rows, 784))
    layouts = {
        "lists": (
            "Parquet, pixels as lists of 784 uint8",
            pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 784),
        ),
        "bytes": (
            "Parquet, pixels as 784 bytes",
            pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(784), rows, [None, pa.py_buffer(pixels.tobytes())]
            ),
        ),
    }
    out = []
    for name, (layout, column) in layouts.items():
        path = folder / f"digits-{name}-{rows}.parquet"
        pq.write_table(
            pa.table({"id": np.arange(rows), "pixels": column}), path, row_group_size=10_000
        )
        out.append(BatchInput(path, layout))
    return out


def sentiment_batch(source: DataSource, folder: Path, rows: int) -> list[BatchInput]:
    """A CSV of SST-2 dev sentences (`id`, `text`), repeated."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    texts = load_sst2(source.folder, "dev").texts
    path = folder / f"sentiment-{rows}.csv"
    pacsv.write_csv(
        pa.table({"id": np.arange(rows), "text": [texts[i % len(texts)] for i in range(rows)]}),
        path,
    )
    return [BatchInput(path, "CSV, id and text")]


def recommender_batch(source: DataSource, folder: Path, rows: int) -> list[BatchInput]:
    """u1.base's ratings of its first users, `rows` users, in u.data's layout (TSV, no
    header), scored per user (top 10)."""
    train = load_movielens(source.folder).train
    users = np.unique(train.users)
    mine = np.isin(train.users, np.resize(users, min(rows, len(users))))
    path = folder / f"recommender-{rows}.data"
    path.write_text(
        "".join(
            f"{u}\t{m}\t{r}\t0\n"
            for u, m, r in zip(
                train.users[mine], train.movies[mine], train.levels[mine], strict=True
            )
        )
    )
    return [BatchInput(path, "u.data layout (TSV, no header), top 10 per user", {"k": 10})]


DIGITS = Workload(
    digits_parts,
    digits_requests,
    encodings=("json", "base64"),
    mixed=digits_mixed,
    lean_target=(0.6, 1.5),
    batch=digits_batch,
    batch_rows=100_000,
)
SENTIMENT = Workload(
    lambda runner, source: cycle(sentiment_texts(runner, source)[0]),
    sentiment_requests,
    extra=sentiment_bucketing,
    overload=True,
    mixed=sentiment_mixed,
    batch=sentiment_batch,
    batch_rows=5_000,
    burst=sentiment_burst,
)
RECOMMENDER = Workload(
    recommender_parts,
    recommender_requests,
    multi_item=False,
    p50_target_ms=10.0,
    mixed=recommender_mixed,
    batch=recommender_batch,
    batch_rows=943,
)
