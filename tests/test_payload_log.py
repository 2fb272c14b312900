"""Payload logging (DLSERVE_PAYLOAD_LOG) against real servers, and replaying its log through
`dlserve score` and `dlserve compare`.

Three servers, one worker each: one logs every request to a directory (records, rotation,
compression, the size cap, replay); one sends CloudEvents to a receiver this test runs, which
then turns slow and then goes away (drops counted, predictions unaffected); one logs outputs
only, for half of the requests, into a directory that then breaks.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.http import Server
from tests.conftest import dlserve, start_server
from tests.routes import RouteCase, route_cases

TEXTS = ["a wonderful, moving film", "dull and far too long", "not bad at all"]
CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"


def counter(metrics: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def records(folder: Path) -> list[dict[str, Any]]:
    """Every record of the closed log files in `folder`, in file order."""
    out = []
    for path in sorted(folder.glob("payloads-*.jsonl.gz")):
        with gzip.open(path, "rb") as f:
            out += [orjson.loads(line) for line in f]
    return out


def logged_body(body: bytes, content_type: str) -> Any:
    """What a record holds for a body under the size cap."""
    if content_type.split(";")[0] == "application/json":
        try:
            return orjson.loads(body or b"null")
        except orjson.JSONDecodeError:
            pass
    return {"content_type": content_type, "base64": base64.b64encode(body).decode()}


@dataclass(frozen=True)
class Sent:
    path: str
    model: str
    content_type: str
    body: bytes
    status: int
    answer: bytes
    answer_type: str
    request_id: str | None


def post(
    client: httpx.Client, path: str, model: str, body: bytes, content_type: str, **headers: str
) -> Sent:
    r = client.post(path, content=body, headers={"content-type": content_type, **headers})
    return Sent(
        path,
        model,
        content_type,
        body,
        r.status_code,
        r.content,
        r.headers.get("content-type", ""),
        r.headers.get("x-request-id"),
    )


def every_route(client: httpx.Client) -> list[Sent]:
    """A valid and a bad request to every predict and infer route the server publishes."""
    cases: list[RouteCase] = route_cases(client.get("/docs.json").json())
    assert {c.path for c in cases} >= {
        "/digits/predict",
        "/digits/predict_image",
        "/sentiment/predict",
        "/recommender/recommend",
    }
    return [
        post(client, case.path, case.model, body, case.content_type)
        for case in cases
        for body in (case.valid, case.bad)
    ]


def mnist_like_images(n: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for image in images:  # a bright stroke somewhere: something for the model to read
        row, col = rng.integers(4, 20, size=2)
        image[row : row + 8, col : col + 3] = 255
    return images.tolist()


@dataclass
class Logged:
    folder: Path
    sent: list[Sent]
    metrics: str
    files: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def logged(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Logged:
    """A server logging every request to a directory, small files and a small size cap;
    stopped by SIGTERM (its queue written out, its last file closed) before the checks."""
    tmp = tmp_path_factory.mktemp("payloads")
    folder = tmp / "log" / "not-yet-there"
    with (
        start_server(
            tmp,
            DLSERVE_WORKERS="1",
            DLSERVE_PAYLOAD_LOG=str(folder),
            DLSERVE_PAYLOAD_LOG_ROTATE_BYTES="4096",
            DLSERVE_PAYLOAD_LOG_MAX_BYTES="30000",
            DLSERVE_DRAIN_DELAY_S="0",
        ) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        sent = every_route(client)
        images = orjson.dumps({"images": mnist_like_images(5)})
        sent.append(post(client, "/digits/predict", "digits", images, "application/json"))
        texts = orjson.dumps({"texts": TEXTS})
        sent.append(
            post(
                client,
                "/sentiment/predict",
                "sentiment",
                texts,
                "application/json",
                **{"X-Request-Id": "client-chosen-id-1"},
            )
        )
        big = orjson.dumps({"images": mnist_like_images(40, seed=1)})  # > 30,000 bytes
        assert len(big) > 30_000
        sent.append(post(client, "/digits/predict", "digits", big, "application/json"))
        time.sleep(0.5)  # the writer's turn
        metrics = server.metrics_text()
        # Stopped as Kubernetes stops a pod: the drain writes out the queue, closes the file.
        server.signal_all(signal.SIGTERM)
        assert server.process is not None
        server.process.wait(timeout=60)
    return Logged(folder, sent, metrics, sorted(folder.iterdir()))


def test_every_route_is_logged_with_what_was_sent_and_answered(logged: Logged) -> None:
    by_id = {r["id"]: r for r in records(logged.folder)}
    assert len(by_id) == len(logged.sent)
    for sent in logged.sent:
        assert sent.request_id is not None, f"{sent.path}: no X-Request-Id"
        record = by_id[sent.request_id]
        assert record["route"] == sent.path and record["model"] == sent.model
        assert record["status"] == sent.status
        assert 0 < record["latency_ms"] < 30_000
        if len(sent.body) <= 30_000:
            assert record["inputs"] == logged_body(sent.body, sent.content_type), sent.path
        assert record["outputs"] == logged_body(sent.answer, sent.answer_type), sent.path
        if sent.status == 200:
            answer = orjson.loads(sent.answer)
            tag = answer.get("model") or f"{answer['model_name']}:{answer['model_version']}"
            assert record["model_tag"] == tag and record["endpoint"] == "default"
    assert "client-chosen-id-1" in by_id
    assert counter(logged.metrics, "dlserve_payload_log_written_total") == len(logged.sent)
    assert counter(logged.metrics, "dlserve_payload_log_dropped_total") == 0


def test_a_body_over_the_size_cap_is_logged_as_its_hash_and_shape(logged: Logged) -> None:
    big = logged.sent[-1]
    record = next(r for r in records(logged.folder) if r["id"] == big.request_id)
    assert record["inputs"]["bytes"] == len(big.body)
    assert record["inputs"]["shape"] == {"images": [40, 28, 28]}
    assert record["inputs"]["sha256"] == hashlib.sha256(big.body).hexdigest()
    assert len(record["outputs"]["predictions"]) == 40  # the answer was under the cap


def test_log_files_rotate_and_each_is_complete_gzip(logged: Logged) -> None:
    names = [p.name for p in logged.files]
    assert len(names) > 2, names  # 4 KiB files
    assert all(n.startswith("payloads-") and n.endswith(".jsonl.gz") for n in names), names
    for path in logged.files:
        with gzip.open(path, "rb") as f:  # a truncated stream raises EOFError
            lines = f.read().splitlines()
        assert lines and all(orjson.loads(line)["id"] for line in lines)


# -- CloudEvents ----------------------------------------------------------------------------


class Receiver:
    """A local HTTP server that keeps every POST it gets; `delay_s` makes it slow, `die()`
    makes it hang up on its open connections and refuse new ones."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.delay_s = 0.0
        self.dead = False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the sink expects

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay_s)
                if outer.dead:  # hang up without an answer; new connections are refused
                    self.close_connection = True
                    return
                outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/events"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def die(self) -> None:
        if not self.dead:
            self.dead = True
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.die()


@pytest.fixture(scope="module")
def events_server(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    with start_server(
        tmp_path_factory.mktemp("events"),
        DLSERVE_WORKERS="1",
        DLSERVE_PAYLOAD_LOG=receiver.url,
        DLSERVE_PAYLOAD_LOG_QUEUE="32",
        DLSERVE_PAYLOAD_LOG_MAX_BYTES="30000",
        DLSERVE_DRAIN_DELAY_S="0",
    ) as server:
        yield server


def wait_for(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_records_reach_a_url_as_kserve_cloudevents(
    events_server: Server, receiver: Receiver
) -> None:
    big_body = orjson.dumps({"images": mnist_like_images(40, seed=1)})  # over the cap
    with httpx.Client(base_url=events_server.url, timeout=30) as client:
        sent = every_route(client)
        big = post(client, "/digits/predict", "digits", big_body, "application/json")
    ids = [s.request_id for s in sent]
    assert all(ids) and len(set(ids)) == len(ids)
    expected = len(sent) + sum(s.status == 200 for s in sent) + 2  # 200s: a response too
    wait_for(lambda: len(receiver.posts) >= expected)
    events: dict[tuple[str, str], tuple[dict[str, str], bytes]] = {
        (h["ce-id"], h["ce-type"]): (h, body) for h, body in receiver.posts
    }
    try:
        from cloudevents.http import from_http
    except ImportError:  # the headers are checked by hand below in any case
        from_http = None
    for s in sent:
        request_headers, request_body = events[(s.request_id, CE_REQUEST)]
        assert request_body == s.body
        assert request_headers["content-type"] == s.content_type
        assert request_headers["ce-specversion"] == "1.0"
        assert request_headers["ce-inferenceservicename"] == s.model
        assert request_headers["ce-route"] == s.path
        assert request_headers["ce-endpoint"] == "default"
        assert request_headers["ce-source"]
        if s.status == 200:
            response_headers, response_body = events[(s.request_id, CE_RESPONSE)]
            assert response_body == s.answer
            assert response_headers["ce-modelversion"].startswith(s.model + ":")
            if from_http is not None:
                event = from_http(response_headers, response_body)
                assert event["type"] == CE_RESPONSE and event["id"] == s.request_id
                assert event["specversion"] == "1.0" and event.data
        else:
            assert (s.request_id, CE_RESPONSE) not in events  # as KServe: 200s only
        if from_http is not None:
            event = from_http(request_headers, request_body)
            assert event["type"] == CE_REQUEST and event["inferenceservicename"] == s.model
    headers, summary = events[(big.request_id, CE_REQUEST)]
    assert headers["ce-omitted"] == "true" and headers["content-type"] == "application/json"
    assert orjson.loads(summary)["sha256"] == hashlib.sha256(big_body).hexdigest()
    assert events[(big.request_id, CE_RESPONSE)][1] == big.answer  # under the cap


def timed_posts(url: str, n: int, clients: int = 8) -> list[tuple[int, float]]:
    """`n` single-image digits requests from `clients` threads: (status, seconds) each."""
    body = orjson.dumps({"images": mnist_like_images(1)})
    headers = {"content-type": "application/json"}

    with httpx.Client(base_url=url, timeout=30) as client:

        def one(_: int) -> tuple[int, float]:
            started = time.perf_counter()
            r = client.post("/digits/predict", content=body, headers=headers)
            return r.status_code, time.perf_counter() - started

        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(one, range(n)))


def test_a_slow_then_dead_sink_drops_records_and_never_slows_a_prediction(
    events_server: Server, receiver: Receiver
) -> None:
    url = events_server.url
    normal = timed_posts(url, 40)
    before = events_server.metrics_text()
    receiver.delay_s = 0.5  # a second per record (two events): the queue of 32 fills
    slow = timed_posts(url, 80)
    during = events_server.metrics_text()
    receiver.die()  # the sink goes down: what is queued is dropped, then all that comes
    receiver.delay_s = 0.0
    dead = timed_posts(url, 80)
    time.sleep(0.5)
    after = events_server.metrics_text()
    assert all(status == 200 for status, _ in normal + slow + dead)
    usual = statistics.median(s for _, s in normal)
    for run in (slow, dead):
        assert statistics.median(s for _, s in run) < 2 * usual + 0.05, (usual, run)
    full = "dlserve_payload_log_dropped_total"
    assert counter(during, full, reason="queue_full") > counter(before, full, reason="queue_full")
    assert counter(after, full, reason="sink_error") > 0


# -- outputs only, sampled, into a directory that breaks ------------------------------------


def test_outputs_only_sampled_and_a_broken_directory(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "log"
    with start_server(
        tmp_path,
        DLSERVE_WORKERS="1",
        DLSERVE_PAYLOAD_LOG=str(folder),
        DLSERVE_PAYLOAD_LOG_MODE="response",
        DLSERVE_PAYLOAD_LOG_SAMPLE_RATE="0.5",
        DLSERVE_PAYLOAD_LOG_ROTATE_S="0.5",
        DLSERVE_DRAIN_DELAY_S="0",
    ) as server:
        body = orjson.dumps({"texts": TEXTS})
        with httpx.Client(base_url=server.url, timeout=30) as client:
            sent = [
                post(client, "/sentiment/predict", "sentiment", body, "application/json")
                for _ in range(60)
            ]
            wait_for(lambda: len(records(folder)) == sum(s.request_id is not None for s in sent))
            kept = {r["id"]: r for r in records(folder)}
            # The directory goes (a lost volume): records are dropped, answers unaffected.
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
            folder.write_text("not a directory any more")
            later = [
                post(client, "/sentiment/predict", "sentiment", body, "application/json")
                for _ in range(40)
            ]
            time.sleep(1.0)
            metrics = server.metrics_text()
    logged = [s for s in sent if s.request_id is not None]
    assert 10 <= len(logged) <= 50, len(logged)  # half of 60, give or take
    assert kept.keys() == {s.request_id for s in logged}
    for s in logged:
        assert "inputs" not in kept[s.request_id]
        assert kept[s.request_id]["outputs"] == orjson.loads(s.answer)
    assert all(s.status == 200 for s in sent + later)
    assert counter(metrics, "dlserve_payload_log_dropped_total", reason="sink_error") > 0
    assert counter(metrics, "dlserve_payload_log_dropped_total", reason="queue_full") == 0


# -- replay ----------------------------------------------------------------------------------


def served_answers(sent: list[Sent], model: str) -> dict[str, dict[str, Any]]:
    """What the service answered each item of `model`, by replay row id: the JSON routes'
    predictions, or the Open Inference Protocol's output tensors."""
    out = {}
    for s in sent:
        if s.model != model or s.status != 200:
            continue
        answer = orjson.loads(s.answer)
        if "predictions" in answer:
            items = answer["predictions"]
        else:
            tensors = {t["name"]: t for t in answer["outputs"]}
            if model == "digits":
                probs = np.asarray(tensors["probabilities"]["data"]).reshape(-1, 10)
                items = [{"digit": int(p.argmax()), "confidence": float(p.max())} for p in probs]
            else:
                items = [
                    {"label": label, "positive_probability": p}
                    for label, p in zip(
                        tensors["label"]["data"],
                        tensors["positive_probability"]["data"],
                        strict=True,
                    )
                ]
        out |= {f"{s.request_id}#{i}": item for i, item in enumerate(items)}
    return out


def table_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def replayed(logged: Logged, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The log replayed through `dlserve score`, per model (Parquet, and JSON Lines)."""
    folder = tmp_path_factory.mktemp("replayed")
    outputs = {"digits": folder / "digits.parquet", "sentiment": folder / "sentiment.jsonl"}
    for model, out in outputs.items():
        dlserve("score", model, str(logged.folder), str(out), "--quiet")
    return outputs


@pytest.mark.parametrize(
    ("model", "label", "number"),
    [("digits", "digit", "confidence"), ("sentiment", "label", "positive_probability")],
)
def test_replaying_the_log_through_score_gives_the_answers_the_service_gave(
    logged: Logged, replayed: dict[str, Path], model: str, label: str, number: str
) -> None:
    out = replayed[model]
    served = served_answers(logged.sent, model)
    rows = {r["id"]: r for r in table_rows(out)}
    rejected = out.with_name(f"{out.stem}.rejects{out.suffix}")
    rejects = {r["id"]: r["reason"] for r in table_rows(rejected)}
    assert rows.keys() | rejects.keys() == served.keys() and not rows.keys() & rejects.keys()
    answered = {s.path for s in logged.sent if s.model == model and s.status == 200}
    assert {r["route"] for r in rows.values()} == answered  # every route, v2 infer too
    for row_id, row in rows.items():
        assert row[label] == served[row_id][label], row_id
        assert row[number] == pytest.approx(served[row_id][number], abs=2e-6), row_id
        assert row["model"] == row["served_by"]
    # The request over the size cap is not lost: each of its images is a rejected row.
    for row_id, reason in rejects.items():
        assert "not in the payload log" in reason, (row_id, reason)
    if model == "digits":
        big = logged.sent[-1].request_id
        assert {f"{big}#{i}" for i in range(40)} == rejects.keys()
    # The service's answers against the replay's: the same version, no disagreement.
    report = orjson.loads(dlserve("compare", model, str(logged.folder), str(out), "--json").stdout)
    assert report["matched"] == len(rows) and report["disagree"] == 0
    assert report["baseline"] == report["candidate"]


def test_compare_reports_where_two_versions_disagree(
    logged: Logged, replayed: dict[str, Path], tmp_path: Path
) -> None:
    out = replayed["digits"]
    table = pq.read_table(out)
    digits = table.column("digit").to_pylist()
    changed = [(d + 1) % 10 if i % 2 == 0 else d for i, d in enumerate(digits)]  # every other
    candidate = tmp_path / "candidate.parquet"
    pq.write_table(
        table.set_column(table.schema.get_field_index("digit"), "digit", pa.array(changed)),
        candidate,
    )
    result = dlserve(
        "compare",
        "digits",
        str(logged.folder),
        str(candidate),
        "--max-disagreement",
        "10",
        check=False,
    )
    assert result.returncode == 1, result.stderr
    disagree = sum(a != b for a, b in zip(digits, changed, strict=True))
    assert f"{disagree:,} disagree" in result.stdout
    assert "baseline label" in result.stdout and "confidence" in result.stdout
    assert "more than --max-disagreement 10 %" in result.stderr
    report = orjson.loads(dlserve("compare", "digits", str(out), str(candidate), "--json").stdout)
    assert report["disagree"] == disagree == sum(s["disagree"] for s in report["by_label"])
    assert sum(s["disagree"] for s in report["by_confidence"]) == disagree


def test_a_model_without_replay_says_so(logged: Logged, tmp_path: Path) -> None:
    result = dlserve(
        "score", "recommender", str(logged.folder), str(tmp_path / "out.parquet"), check=False
    )
    assert result.returncode == 2
    assert "cannot replay a payload log yet" in result.stderr
