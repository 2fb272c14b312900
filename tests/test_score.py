"""`dlserve score`, the real command on real files: the service's answers for all three
models, bad rows to the rejects file in the API's words, jobs that stop before any work,
and a job killed with SIGKILL twice that still writes every row exactly once."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.json  # noqa: F401 - pa.json
import pyarrow.parquet as pq
import pytest

from readers.mnist import load_mnist
from readers.movielens import load_movielens
from readers.sst2 import load_sst2
from tests.conftest import ROOT, dlserve
from tests.images import as_user_file


def digits_table(data_dir: Path, n: int, *, start: int = 0) -> pa.Table:
    images = load_mnist(data_dir, "test").images
    picked = np.resize(images, (start + n, 28, 28))[start:].reshape(n, 784)
    return pa.table(
        {
            "id": np.arange(start, start + n),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(picked.reshape(-1)), 784),
        }
    )


def read(path: Path) -> pa.Table:
    return pq.read_table(path)


def test_digits_rows_get_the_answers_of_both_digits_routes(
    client: httpx.Client, digits_model: str, data_dir: Path, tmp_path: Path
) -> None:
    table = digits_table(data_dir, 40)
    pq.write_table(table, tmp_path / "in.parquet")
    dlserve("score", "digits", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"))
    images = load_mnist(data_dir, "test").images[:40]
    http = client.post("/digits/predict", json={"images": images.tolist()}).json()
    out = read(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == list(range(40))
    assert [{k: r[k] for k in ("digit", "confidence", "probabilities")} for r in out] == http[
        "predictions"
    ]
    assert {r["model"] for r in out} == {http["model"]} == {digits_model}
    # The same pixels as 784 bytes a row (the compact form): the same answers.
    raw = pa.array([bytes(images[i].tobytes()) for i in range(40)], pa.binary())
    pq.write_table(pa.table({"id": range(40), "pixels": raw}), tmp_path / "raw.parquet")
    dlserve("score", "digits", str(tmp_path / "raw.parquet"), str(tmp_path / "raw.out.parquet"))
    assert read(tmp_path / "raw.out.parquet").equals(read(tmp_path / "out.parquet"))

    # Image files, as a folder (the id is the file name), through /digits/predict_image.
    folder = tmp_path / "images"
    folder.mkdir()
    files = {
        f"{i:02d}.png" if t == "image/png" else f"{i:02d}.jpg": body
        for i, (body, t) in enumerate(as_user_file(images[i], i % 4) for i in range(8))
    }
    for name, body in files.items():
        (folder / name).write_bytes(body)
    (folder / "notes.txt").write_text("not an image")
    dlserve("score", "digits", str(folder), str(tmp_path / "files.jsonl"))
    scored = pa.json.read_json(tmp_path / "files.jsonl").to_pylist()
    for row in scored:
        answer = client.post(
            "/digits/predict_image", content=files[row["id"]], headers={"Content-Type": "image/png"}
        ).json()
        assert {k: row[k] for k in ("digit", "confidence", "probabilities")} == answer[
            "predictions"
        ][0]
    assert sorted(r["id"] for r in scored) == sorted(files)
    (rejected,) = pa.json.read_json(tmp_path / "files.rejects.jsonl").to_pylist()
    refusal = client.post(
        "/digits/predict_image", content=b"not an image", headers={"Content-Type": "image/png"}
    ).json()["error"]
    assert rejected["id"] == "notes.txt"
    assert rejected["reason"] == refusal.replace("body", "image", 1)


def test_sentiment_rows_get_the_answers_of_the_route(
    client: httpx.Client, sentiment_model: str, data_dir: Path, tmp_path: Path
) -> None:
    texts = load_sst2(data_dir, "dev").texts[:60] + ["It's a charming, often affecting film!"]
    with open(tmp_path / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review_id", "review"])
        writer.writerows([(f"r{i}", t) for i, t in enumerate(texts)])
    dlserve(
        "score",
        "sentiment",
        str(tmp_path / "reviews.csv"),
        str(tmp_path / "out.csv"),
        "--id-column",
        "review_id",
        "--column",
        "text=review",
        "--batch-size",
        "7",
    )
    with open(tmp_path / "out.csv") as f:
        out = list(csv.DictReader(f))
    http = client.post("/sentiment/predict", json={"texts": texts}).json()
    assert [r["review_id"] for r in out] == [f"r{i}" for i in range(len(texts))]
    assert [
        {"label": r["label"], "positive_probability": float(r["positive_probability"])} for r in out
    ] == http["predictions"]


def test_recommender_users_and_pairs_get_the_answers_of_both_routes(
    client: httpx.Client, recommender_model: str, data_dir: Path, tmp_path: Path
) -> None:
    base = load_movielens(data_dir / "ml-100k").train
    users = np.unique(base.users)[:12]
    # u.data's layout (tab-separated, no header) and in its order, users interleaved.
    lines = [
        f"{u}\t{m}\t{r}\t0"
        for u, m, r in zip(base.users, base.movies, base.levels, strict=True)
        if u in users
    ]
    random.Random(0).shuffle(lines)
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    dlserve(
        "score", "recommender", str(tmp_path / "u.data"), str(tmp_path / "top.parquet"), "--k", "5"
    )
    out = read(tmp_path / "top.parquet").to_pylist()
    assert [r["user_id"] for r in out] == users.tolist()
    pairs = [(int(u), m) for u in users[:4] for m in (1, 50, 181)]
    for row in out:
        mine = base.users == row["user_id"]
        ratings = [
            {"movie_id": int(m), "rating": int(r)}
            for m, r in zip(base.movies[mine], base.levels[mine], strict=True)
        ]
        http = client.post("/recommender/recommend", json={"ratings": ratings, "k": 5}).json()
        assert {k: row[k] for k in ("cold_start", "ranking", "recommendations")} == {
            k: http[k] for k in ("cold_start", "ranking", "recommendations")
        }

    # user_id, movie_id pairs, given the same ratings table (and one user it does not hold).
    pairs.append((99999, 50))
    pq.write_table(
        pa.table({"user_id": [u for u, _ in pairs], "movie_id": [m for _, m in pairs]}),
        tmp_path / "pairs.parquet",
    )
    dlserve(
        "score",
        "recommender",
        str(tmp_path / "pairs.parquet"),
        str(tmp_path / "pairs.jsonl"),
        "--ratings",
        str(tmp_path / "u.data"),
    )
    predicted = pa.json.read_json(tmp_path / "pairs.jsonl").to_pylist()
    assert [(r["user_id"], r["movie_id"]) for r in predicted] == pairs
    for user in {u for u, _ in pairs}:
        mine = base.users == user
        ratings = [
            {"movie_id": int(m), "rating": int(r)}
            for m, r in zip(base.movies[mine], base.levels[mine], strict=True)
        ]
        movies = [m for u, m in pairs if u == user]
        http = client.post(
            "/recommender/predict", json={"ratings": ratings, "movie_ids": movies}
        ).json()
        assert [
            (r["cold_start"], r["predicted_rating"]) for r in predicted if r["user_id"] == user
        ] == [(http["cold_start"], a["predicted_rating"]) for a in http["predicted_ratings"]]


def test_bad_rows_go_to_the_rejects_file_in_the_apis_words(
    client: httpx.Client, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    rows = [
        {"id": 1, "text": "A fine film."},
        {"id": 2, "text": "   "},
        {"id": None, "text": "no id"},
        {"id": 4, "text": None},
        {"id": 5, "text": "x" * 100_001},
        {"id": 6, "text": "Dull."},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "texts.parquet")
    result = dlserve(
        "score", "sentiment", str(tmp_path / "texts.parquet"), str(tmp_path / "out.parquet")
    )
    assert "4 rejected" in result.stdout
    assert read(tmp_path / "out.parquet").column("id").to_pylist() == [1, 6]
    rejects = read(tmp_path / "out.rejects.parquet").to_pylist()
    http = {
        t: client.post("/sentiment/predict", json={"texts": [t]}).json()["error"]
        for t in ("   ", "x" * 100_001)
    }
    assert rejects == [
        {"id": 2, "row": 1, "reason": http["   "].replace("texts[0]", "text")},
        {"id": None, "row": 2, "reason": "id: missing; every row needs an id"},
        {"id": 4, "row": 3, "reason": "text: missing"},
        {"id": 5, "row": 4, "reason": http["x" * 100_001].replace("texts[0]", "text")},
    ]

    ratings = tmp_path / "ratings.csv"
    ratings.write_text(
        "userId,movieId,rating,timestamp\n7,50,5,0\n7,99999,4,0\n7,172,6,0\n7,50,3,0\n8,181,4.5,0\n"
    )
    dlserve("score", "recommender", str(ratings), str(tmp_path / "recs.csv"), "--k", "3")
    with open(tmp_path / "recs.rejects.csv") as f:
        rejects = list(csv.DictReader(f))
    assert [(r["userId"], r["row"]) for r in rejects] == [("7", "1"), ("7", "2"), ("7", "3")]
    unknown = client.post(
        "/recommender/recommend", json={"ratings": [{"movie_id": 99999, "rating": 4}]}
    ).json()["error"]
    assert rejects[0]["reason"] == unknown.replace("ratings[0].movie_id", "movieId")
    assert rejects[1]["reason"] == "rating: expected a number from 1 to 5, got 6.0"
    assert rejects[2]["reason"].startswith("movieId: movie 50 is rated twice (also at row 0)")

    # Past --max-rejects the job stops with status 1, keeping its work for a re-run.
    stopped = dlserve(
        "score",
        "sentiment",
        str(tmp_path / "texts.parquet"),
        str(tmp_path / "strict.parquet"),
        "--max-rejects",
        "2",
        check=False,
    )
    assert stopped.returncode == 1 and "more than --max-rejects 2" in stopped.stderr
    assert not (tmp_path / "strict.parquet").exists()
    dlserve(
        "score",
        "sentiment",
        str(tmp_path / "texts.parquet"),
        str(tmp_path / "strict.parquet"),
        "--max-rejects",
        "4",
    )
    assert read(tmp_path / "strict.parquet").column("id").to_pylist() == [1, 6]


def test_a_job_that_cannot_run_stops_before_any_work_naming_the_problem(
    digits_model: str, data_dir: Path, tmp_path: Path
) -> None:
    pq.write_table(digits_table(data_dir, 3), tmp_path / "in.parquet")
    ok = [str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")]
    cases = [
        (["digits", str(tmp_path / "nope.parquet"), ok[1]], "nope.parquet: no such file"),
        (["digits", ok[0], str(tmp_path / "no" / "out.parquet")], "does not exist"),
        (["digits", ok[0], ok[1], "--id-column", "key"], "no column 'key' (id)"),
        (["digits", ok[0], ok[1], "--model-tag", "nosuchversion"], "not in the model store"),
    ]
    for args, message in cases:
        r = dlserve("score", *args, check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert not list(tmp_path.glob("out*")) and not (tmp_path / "no").exists()
    (tmp_path / "garbage.csv").write_bytes(b"\x00\xff" * 50)
    r = dlserve("score", "sentiment", str(tmp_path / "garbage.csv"), ok[1], check=False)
    assert r.returncode == 2 and "garbage.csv" in r.stderr
    # A model with no scoring adapter (the registry's fourth model) is refused by name.
    r = dlserve(
        "score",
        "mlp",
        *ok,
        check=False,
        env={"DLSERVE_MODEL_MODULES": "tests.fourth_model", "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and "model 'mlp' declares no batch scoring" in r.stderr

    # A finished job says so and does nothing; --overwrite scores again.
    dlserve("score", "digits", *ok)
    written = (tmp_path / "out.parquet").stat().st_mtime_ns
    again = dlserve("score", "digits", *ok)
    assert "nothing to do" in again.stderr
    assert (tmp_path / "out.parquet").stat().st_mtime_ns == written
    dlserve("score", "digits", *ok, "--overwrite")
    assert (tmp_path / "out.parquet").stat().st_mtime_ns != written


def test_a_job_killed_twice_at_random_points_finishes_with_every_row_once(
    digits_model: str, data_dir: Path, tmp_path: Path
) -> None:
    pq.write_table(
        digits_table(data_dir, 30_000), tmp_path / "in.parquet", row_group_size=7_000
    )  # row groups across chunk boundaries
    args = ["digits", str(tmp_path / "in.parquet"), "--chunk-rows", "1000", "--quiet"]
    dlserve("score", *args[:2], str(tmp_path / "whole.parquet"), *args[2:])

    out, partial = tmp_path / "out.parquet", tmp_path / "out.parquet.partial"
    cli = Path(sys.executable).with_name("dlserve")
    rng = random.Random(os.getpid())
    for attempt in range(2):
        proc = subprocess.Popen(
            [str(cli), "score", *args[:2], str(out), *args[2:]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Wait for this run's first new part, then kill at a random moment after it.
            before = len(list(partial.glob("part-*.parquet"))) if partial.exists() else 0
            deadline = time.monotonic() + 120
            while (
                (not partial.exists() or len(list(partial.glob("part-*.parquet"))) <= before)
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.4))
            assert proc.poll() is None, f"attempt {attempt}: the job ended before the kill"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert not out.exists() and partial.is_dir()
    result = dlserve("score", *args[:2], str(out), *args[2:])
    assert result.returncode == 0 and not partial.exists()
    scored = read(out)
    assert scored.column("id").to_pylist() == list(range(30_000))
    assert scored.equals(read(tmp_path / "whole.parquet"))


def test_the_bench_batch_section_compares_the_engine_with_the_ceiling(
    digits_model: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's batch section on 2,000 images (the real bench scores 100,000); the Ray
    engine's part is left out here (tests/test_score_ray.py runs the Ray engine)."""
    from bench import batch
    from bench.sections import BenchContext
    from bench.workloads import DIGITS
    from dlserve.registry import DataSource
    from dlserve.settings import load_settings

    monkeypatch.setattr(batch, "start_ray", lambda actors: None)
    settings = load_settings(models="digits")
    ctx = BenchContext(
        settings,
        {"digits": (replace(DIGITS, batch_rows=2_000), DataSource(data_dir, None))},
        1,
        1,
        1,
    )
    results = batch.run(ctx)
    lists, raw = results["models"]  # pixels as lists of 784 values, and as 784 bytes
    for row in (lists, raw):
        assert row["model"] == "digits" and row["rows"] == 2_000 and row["rejected"] == 0
        assert row["rows_per_s"] > 0 and row["ceiling_items_per_s"] > 0
        assert row["ratio"] == pytest.approx(
            row["rows_per_s"] / row["ceiling_items_per_s"], abs=1e-3
        )
    assert lists["rss_rows"] == [200, 2_000] and all(m > 50 for m in lists["rss_mib"])
    assert "## Batch scoring" in "\n".join(batch.render(results, {}))
