"""Slow and greedy clients against real 2-worker servers: headers and bodies that trickle
are cut with 408, a thousand of them do not starve ordinary requests, connections past
the cap get 503 at once, and a client that writes its whole body first reads its 413."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from bench.http import Server
from tests.conftest import start_server

# timeouts measured to the second, and a p99 bound under 1,000 connections
pytestmark = pytest.mark.exclusive

DIGIT = json.dumps({"images": [[[0] * 28] * 28]}).encode()
SLOW_CONNECTIONS = 1000


@pytest.fixture(scope="module")
def slow(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """Short header and body timeouts, so that the tests see them fire."""
    with start_server(
        tmp_path_factory.mktemp("slow"),
        DLSERVE_WORKERS="2",
        DLSERVE_HEADER_TIMEOUT_S="1.5",
        DLSERVE_BODY_TIMEOUT_S="1.5",
        DLSERVE_MIN_BODY_RATE="2000",
        DLSERVE_BODY_GRACE_S="3",
    ) as running:
        yield running


def connect(server: Server) -> socket.socket:
    url = urlsplit(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=15)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_silent_connection_gets_408_after_the_header_timeout(slow: Server) -> None:
    with connect(slow) as sock:
        started = time.monotonic()
        status, headers, body = read_answer(sock)  # until the server closes
    assert status == 408 and "DLSERVE_HEADER_TIMEOUT_S" in json.loads(body)["error"]
    assert headers["connection"] == "close" and 1.3 < time.monotonic() - started < 5


def test_headers_that_trickle_get_408(slow: Server) -> None:
    with connect(slow) as sock:
        for piece in (b"POST /digits/predict HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n"):
            sock.sendall(piece)
            time.sleep(0.6)  # each piece in time for an idle timer, not for the headers
        status, _, body = read_answer(sock)
    assert (
        status == 408 and "headers did not arrive within 1.5 seconds" in json.loads(body)["error"]
    )


def test_a_body_that_stops_gets_408(slow: Server) -> None:
    with connect(slow) as sock:
        sock.sendall(
            b"POST /digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b'application/json\r\nContent-Length: 10000\r\n\r\n{"images":'
        )
        status, _, body = read_answer(sock)
    assert status == 408 and re.search(
        r"no body bytes for 1.5 seconds .*DLSERVE_BODY_TIMEOUT_S", json.loads(body)["error"]
    )


def test_a_body_below_the_minimum_rate_gets_408(slow: Server) -> None:
    with connect(slow) as sock:
        sock.sendall(
            b"POST /digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        sock.settimeout(0.5)
        answer = b""
        for _ in range(40):  # 100 bytes every 0.3 s: 333 B/s, under the 2,000 B/s minimum
            try:
                sock.sendall(b" " * 100)
                answer += sock.recv(65536)
                break
            except TimeoutError:
                time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(10)
        with pytest.raises(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
            raise OSError("closed")
    assert b" 408 " in answer.split(b"\r\n")[0] and b"DLSERVE_MIN_BODY_RATE" in answer


async def trickle_headers(url: urlsplit, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(b"POST /sentiment/predict HTTP/1.1\r\n")
    while not stop.is_set():  # one more header line every second: never done
        await asyncio.sleep(1)
        writer.write(b"X-Slow: 1\r\n")
    writer.close()


async def trickle_body(url: urlsplit, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        b"POST /sentiment/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    while not stop.is_set():
        await asyncio.sleep(1)
        writer.write(b" ")
    writer.close()


def test_a_thousand_slow_connections_do_not_starve_ordinary_requests(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Half trickle their headers, half their bodies, for the whole run (the timeouts are
    the defaults, 60 s); an ordinary client meanwhile gets every answer, fast."""
    with start_server(tmp_path_factory.mktemp("slowloris"), DLSERVE_WORKERS="2") as server:
        url = urlsplit(server.url)
        latencies: list[float] = []
        statuses: list[int] = []

        async def main() -> int:
            stop = asyncio.Event()
            slow = [
                asyncio.create_task(
                    trickle_headers(url, stop) if i % 2 else trickle_body(url, stop)
                )
                for i in range(SLOW_CONNECTIONS)
            ]
            await asyncio.sleep(3)  # all of them connected and stalling
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                for _ in range(300):
                    started = time.perf_counter()
                    r = await client.post(
                        "/digits/predict",
                        content=DIGIT,
                        headers={"Content-Type": "application/json"},
                    )
                    latencies.append(time.perf_counter() - started)
                    statuses.append(r.status_code)
            held = sum(not t.done() for t in slow)
            stop.set()
            await asyncio.gather(*slow, return_exceptions=True)
            return held

        held = asyncio.run(main())
    assert held == SLOW_CONNECTIONS, f"only {held} slow connections were still held"
    assert statuses == [200] * len(statuses), sorted(set(statuses))
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(
        f"\n{SLOW_CONNECTIONS} slow connections held; ordinary requests: "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    assert p99 < 0.2, f"p99 {p99 * 1000:.0f} ms"


def test_connections_past_the_cap_get_503_at_once(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with start_server(
        tmp_path_factory.mktemp("cap"), DLSERVE_WORKERS="1", DLSERVE_MAX_CONNECTIONS="10"
    ) as server:
        held = [connect(server) for _ in range(10)]
        try:
            with connect(server) as extra:
                started = time.monotonic()
                status, headers, body = read_answer(extra)
            assert status == 503 and headers["retry-after"] == "1"
            assert "DLSERVE_MAX_CONNECTIONS" in json.loads(body)["error"]
            assert time.monotonic() - started < 1
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)
        assert httpx.get(server.url + "/readyz").status_code == 200


def test_a_client_that_sends_its_whole_body_first_reads_the_413(server: str) -> None:
    """urllib writes the whole body, then reads: it must see the 413, not a broken pipe."""
    body = b'{"texts": ["' + b"a" * (9 << 20) + b'"]}'
    request = urllib.request.Request(
        server + "/sentiment/predict", data=body, headers={"Content-Type": "application/json"}
    )
    for _ in range(5):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert "DLSERVE_MAX_BODY_BYTES" in json.loads(refused.value.read())["error"]
