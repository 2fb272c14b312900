"""Work for clients that have gone is dropped, and a request that cannot start before its
deadline is refused at once: against the real server (2 workers), with real sockets that
hang up, and the metrics that count both."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from service.batching import STAGES
from tests.test_service_digits import metric_total

# bounds on how soon an ordinary request is answered after hang-ups
pytestmark = pytest.mark.exclusive

# About 200 words each: long enough that 8 requests of 256 keep both workers busy for
# seconds, well under the body limit (8 requests of ~300 KB).
LONG_TEXT = " ".join(["the plot wanders for a while before the ending lands"] * 20)
HANGUPS = 8
ITEMS = 256


def send_and_hang_up(
    url: str, body: bytes, after_s: float, clients: int, until: Callable[[], bool] | None = None
) -> None:
    """`clients` connections each send the whole request at once, then close without reading
    the answer `after_s` later (or, with `until`, once it says so, within 30 s)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = (
        f"POST /sentiment/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sockets = [socket.create_connection((host, port)) for _ in range(clients)]
    for s in sockets:
        s.sendall(head + body)
    time.sleep(after_s)
    deadline = time.monotonic() + 30
    while until is not None and not until() and time.monotonic() < deadline:
        time.sleep(0.02)
    for s in sockets:
        s.close()


def wait_until_idle(client: httpx.Client, quiet_s: float = 1.5, limit_s: float = 60) -> float:
    """Sentiment items predicted once the count has stopped moving for `quiet_s`."""
    deadline = time.monotonic() + limit_s
    last = metric_total(client, "dlserve_items_predicted_total", model="sentiment")
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = metric_total(client, "dlserve_items_predicted_total", model="sentiment")
        if now == last:
            return now
        last = now
    raise AssertionError("the server was still predicting a minute after the clients left")


def answered_total(client: httpx.Client) -> float:
    """Sentiment predictions answered (BentoML's own request counter): with 200, or with
    503 when a request that would have finished past its deadline was refused at once."""
    return sum(
        metric_total(
            client,
            "bentoml_service_request_total",
            endpoint="/sentiment/predict",
            http_response_code=code,
        )
        for code in ("200", "503")
    )


def test_requests_of_clients_that_hang_up_are_dropped_before_they_run(
    client: httpx.Client, server: str
) -> None:
    before = wait_until_idle(client)
    abandoned = {
        stage: metric_total(
            client, "dlserve_requests_abandoned_total", model="sentiment", stage=stage
        )
        for stage in STAGES
    }
    prepared = metric_total(client, "dlserve_preprocess_seconds_count", model="sentiment")
    answered = answered_total(client)
    body = orjson.dumps({"texts": [LONG_TEXT] * ITEMS})
    # Hang up once half the requests are prepared: their 4 runs of 64 texts each are then
    # queued behind the one that runs (a run of 64 long texts takes a tenth of a second or
    # more), while the others are still being tokenised.
    send_and_hang_up(
        server,
        body,
        after_s=0,
        clients=HANGUPS,
        until=lambda: (
            metric_total(client, "dlserve_preprocess_seconds_count", model="sentiment")
            >= prepared + HANGUPS / 2
        ),
    )
    ordinary = client.post("/sentiment/predict", json={"texts": ["a fine film"]})
    assert ordinary.status_code == 200, ordinary.text
    ran = wait_until_idle(client) - before - 1
    dropped = {
        stage: metric_total(
            client, "dlserve_requests_abandoned_total", model="sentiment", stage=stage
        )
        - abandoned[stage]
        for stage in STAGES
    }
    # Every hang-up is counted once, at the stage it had reached (its body not yet all read
    # counts as preparing), unless its answer was already written (on a slow machine a
    # request of the first worker can finish, or be refused at once, before half of all
    # are prepared); what was queued never ran, so far from all of it ran.
    finished = answered_total(client) - answered - 1
    assert sum(dropped.values()) + finished == HANGUPS, (dropped, finished)
    assert finished < HANGUPS / 2, (dropped, finished)  # most were still in hand
    # The half prepared when the clients left had finished, or were dropped from the queue
    # or their run; on CI's loaded machine 3 of the 4 had finished, so at least one.
    assert dropped["queued"] + dropped["running"] + finished >= HANGUPS / 2, (dropped, finished)
    assert dropped["queued"] + dropped["running"] >= 1, dropped
    assert ran <= (HANGUPS / 2) * ITEMS, f"{ran} of {HANGUPS * ITEMS} texts ran; {dropped}"


def test_a_request_that_cannot_start_before_its_deadline_gets_503_at_once(
    client: httpx.Client,
) -> None:
    shed = metric_total(client, "dlserve_requests_shed_total", model="sentiment", reason="deadline")
    r = client.post(
        "/sentiment/predict",
        json={"texts": ["a fine film"]},
        headers={"Request-Timeout": "0.000001"},
    )
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert (
        "refused now rather than answered late" in r.json()["error"]
        or "could not start within 1e-06 seconds (its Request-Timeout header)" in r.json()["error"]
    )
    assert (
        metric_total(client, "dlserve_requests_shed_total", model="sentiment", reason="deadline")
        == shed + 1
    )
    # A deadline the server can meet changes nothing.
    r = client.post(
        "/sentiment/predict", json={"texts": ["a fine film"]}, headers={"Request-Timeout": "20"}
    )
    assert r.status_code == 200, r.text


def test_the_protocol_route_honours_the_deadline_too(client: httpx.Client) -> None:
    body = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]
    }
    r = client.post(
        "/v2/models/sentiment/infer", json=body, headers={"Request-Timeout": "0.000001"}
    )
    assert r.status_code == 503, r.text
    assert "Retry-After" in r.headers


def test_a_deadline_that_is_not_a_number_is_a_400_naming_the_header(client: httpx.Client) -> None:
    for bad in ("soon", "-1", "0", "nan", "inf"):
        r = client.post(
            "/sentiment/predict", json={"texts": ["a fine film"]}, headers={"Request-Timeout": bad}
        )
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == f"Request-Timeout {bad!r} is not a positive number of seconds"
