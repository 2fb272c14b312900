"""A rolling restart: two servers behind nothing but their readiness, each stopped with
SIGTERM and started again while clients keep sending; a client that follows the retry
rule (docs/http-api.md, "Retrying") loses no request and doubles none."""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from bench.http import Server
from tests.conftest import start_server

# a rolling restart under load that must lose no request
pytestmark = pytest.mark.exclusive

DIGIT = {"images": [[[0] * 28] * 28]}
RETRY_STATUSES = (503,)


class Balancer:
    """What a load balancer does with readiness: polls /readyz and picks a ready server."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.ready: set[str] = {s.url for s in servers}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.stop.is_set():
            for server in self.servers:
                try:
                    ok = httpx.get(server.url + "/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    ok = False
                (self.ready.add if ok else self.ready.discard)(server.url)
            time.sleep(0.2)

    def pick(self) -> str | None:
        ready = sorted(self.ready)
        return random.choice(ready) if ready else None


def send_with_retries(
    balancer: Balancer,
    request_id: int,
    log: list[tuple[int, int, int]],
) -> None:
    """The retry rule of docs/http-api.md: retry (on a ready server) after a connection that was
    refused or dropped before an answer, and after a 503, waiting its Retry-After."""
    for attempt in itertools.count(1):
        url = balancer.pick()
        if url is None:
            time.sleep(0.1)
            continue
        try:
            r = httpx.post(
                url + "/digits/predict",
                json=DIGIT,
                headers={"X-Request-Id": str(request_id)},
                timeout=30,
            )
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            time.sleep(0.1)
            continue
        if r.status_code in RETRY_STATUSES:
            time.sleep(float(r.headers.get("Retry-After", "1")))
            continue
        log.append((request_id, r.status_code, attempt))
        return


def restart(server: Server) -> float:
    """SIGTERM the server, wait for it to exit, start it again on its port: seconds down."""
    stopped = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=60)
    server.start()
    return time.monotonic() - stopped


@pytest.fixture
def pair(digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        start_server(
            tmp_path / "a",
            DLSERVE_MODELS="digits",
            DLSERVE_WORKERS="1",
            DLSERVE_DRAIN_DELAY_S="1",
            DLSERVE_DRAIN_TIMEOUT_S="10",
        ) as a,
        start_server(
            tmp_path / "b",
            DLSERVE_MODELS="digits",
            DLSERVE_WORKERS="1",
            DLSERVE_DRAIN_DELAY_S="1",
            DLSERVE_DRAIN_TIMEOUT_S="10",
        ) as b,
    ):
        yield [a, b]


def test_a_rolling_restart_loses_no_request(pair: list[Server]) -> None:
    balancer = Balancer(pair)
    log: list[tuple[int, int, int]] = []
    ids = itertools.count()
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            send_with_retries(balancer, next(ids), log)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        time.sleep(1)
        downtime = [restart(server) for server in pair]
        time.sleep(1)
    finally:
        done.set()
        for c in clients:
            c.join(timeout=60)
        balancer.stop.set()
    answered = Counter(request_id for request_id, _, _ in log)
    sent = max(answered) + 1
    assert sorted(answered) == list(range(sent)), "a request was lost"
    assert set(answered.values()) == {1}, "a request was answered twice"
    assert {status for _, status, _ in log} == {200}
    retried = sum(attempts > 1 for _, _, attempts in log)
    print(
        f"\nrolling restart: {sent} requests, all 200, {retried} needed a retry; "
        f"each server down {downtime[0]:.1f} and {downtime[1]:.1f} s"
    )
