"""Limits and the API key, against real servers: the body limit on the shared server (its
default, 8 MiB), and a strict server with an API key, a concurrency cap of 2 and a short
request timeout for the rest."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import start_server

KEY = "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 8 * 1024 * 1024  # DLSERVE_MAX_BODY_BYTES' default
TEXT = {"texts": ["a fine, moving film"]}
# About 8 MB of text: tokenising it takes far longer than the strict server's timeout.
SLOW = {"texts": ["word " * 20_000] * 80}


def raw_connection(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the raw response (head and body) read from a plain socket."""
    data = b""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        if length and len(body) >= int(length.group(1)):
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_declared_oversized_body_is_refused_before_it_is_sent(server: str) -> None:
    with raw_connection(server) as sock:
        sock.sendall(
            b"POST /sentiment/predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        # Not one byte of the body sent: the answer can only come from the header.
        status, data = read_status(sock)
    assert status == 413 and b"DLSERVE_MAX_BODY_BYTES" in data, data


def test_chunked_oversized_body_is_cut_off_at_the_limit(server: str) -> None:
    sent = 0
    chunk = b" " * 65536
    with raw_connection(server) as sock:
        sock.sendall(
            b"POST /sentiment/predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.settimeout(0.001)
        try:
            while sent < 4 * LIMIT:  # a client that would send 32 MiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        sock.settimeout(10)
        status, data = read_status(sock)
    assert status == 413 and b"DLSERVE_MAX_BODY_BYTES" in data, data
    # Socket buffers hold a few MiB in flight; the server stopped reading right at the limit.
    assert sent < LIMIT + 8 * 1024 * 1024, f"{sent} bytes sent before the 413"


def test_a_body_just_under_the_limit_is_read(client: httpx.Client) -> None:
    body = b'{"texts": ["' + b"a" * 90_000 + b'"], "pad": "' + b" " * (LIMIT - 90_100) + b'"}'
    assert len(body) <= LIMIT
    assert (
        client.post(
            "/sentiment/predict", content=body, headers={"Content-Type": "application/json"}
        ).status_code
        == 200
    )


@pytest.fixture(scope="module")
def strict(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    with start_server(
        tmp_path_factory.mktemp("strict"),
        DLSERVE_WORKERS="1",
        DLSERVE_API_KEY=KEY,
        DLSERVE_MAX_CONCURRENCY="2",
        DLSERVE_REQUEST_TIMEOUT_S="0.3",
        DLSERVE_KEEPALIVE_REQUESTS="1",
        DLSERVE_DOCS="false",
    ) as running:
        yield running.url


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": KEY},
    ],
)
@pytest.mark.parametrize(
    "path", ["/sentiment/predict", "/digits/predict", "/models", "/docs.json", "/no/such/route"]
)
def test_without_the_right_key_every_route_is_401(
    strict: str, path: str, headers: dict[str, str]
) -> None:
    method = "GET" if path in ("/models", "/docs.json") else "POST"
    r = httpx.request(method, strict + path, json=TEXT, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["error"]


def test_with_the_key_predictions_work(strict: str) -> None:
    r = httpx.post(strict + "/sentiment/predict", json=TEXT, headers=AUTH)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("positive", "negative")
    assert httpx.get(strict + "/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("path", ["/", "/docs", "/docs.json", "/demo", "/static/dlserve/demo.js"])
def test_with_the_docs_turned_off_the_pages_are_404(strict: str, path: str) -> None:
    """DLSERVE_DOCS=false: no docs, no demo, not BentoML's own docs page either; and
    without the key, 401 like any other route (the pages are open only when on)."""
    r = httpx.get(strict + path, headers=AUTH)
    assert r.status_code == 404 and "DLSERVE_DOCS=false" in r.json()["error"], r.text
    assert httpx.get(strict + path).status_code == 401


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics"])
def test_health_and_metrics_stay_open(strict: str, path: str) -> None:
    assert httpx.get(strict + path).status_code == 200


def once_idle(method: str, url: str, wait_s: float = 30.0, **kwargs: object) -> httpx.Response:
    """The request, retried while it gets 504: threads still preparing timed-out 8 MB
    requests can keep the worker busy past the strict server's 0.3 s timeout a while."""
    deadline = time.monotonic() + wait_s
    while (r := httpx.request(method, url, **kwargs)).status_code == 504:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return r


def test_a_request_over_the_timeout_gets_504_and_the_server_carries_on(strict: str) -> None:
    started = time.perf_counter()
    r = httpx.post(strict + "/sentiment/predict", json=SLOW, headers=AUTH, timeout=30)
    assert r.status_code == 504, r.text[:300]
    # The guard's answer, not BentoML's ("Not able to process..."), whose middleware
    # service/bentoml_patches.py drops.
    assert "not answered within 0.3 seconds (DLSERVE_REQUEST_TIMEOUT_S)" in r.json()["error"]
    assert time.perf_counter() - started < 5
    r = once_idle("POST", strict + "/sentiment/predict", json=TEXT, headers=AUTH)
    assert r.status_code == 200, r.text


def test_requests_over_the_concurrency_cap_get_429_with_retry_after(strict: str) -> None:
    def post(_: int) -> httpx.Response:
        return httpx.post(strict + "/sentiment/predict", json=SLOW, headers=AUTH, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(12)))
    statuses = sorted(r.status_code for r in answers)
    refused = [r for r in answers if r.status_code == 429]
    assert refused and set(statuses) <= {429, 504}, statuses
    assert all(r.headers["Retry-After"] == "1" for r in refused)
    assert "DLSERVE_MAX_CONCURRENCY=2" in refused[0].json()["error"]
    # Health checks are not counted against the cap, and the server recovers.
    assert httpx.get(strict + "/readyz").status_code != 429
    assert once_idle("GET", strict + "/readyz").status_code == 200
    r = once_idle("POST", strict + "/sentiment/predict", json=TEXT, headers=AUTH)
    assert r.status_code == 200, r.text


def test_refusals_are_counted_in_metrics(strict: str) -> None:
    r = once_idle("GET", strict + "/metrics")
    assert r.status_code == 200, r.text
    text = r.text
    for reason in ("http_401", "http_429"):
        assert f'reason="{reason}"' in text, reason


def test_about_one_response_in_keepalive_requests_closes_its_connection(
    client: httpx.Client,
) -> None:
    # The default, DLSERVE_KEEPALIVE_REQUESTS=100: about 10 closes in 1,000 responses (fewer
    # than 1 or more than 30 would happen by chance less than once in 10,000 runs).
    answers = [client.get("/livez") for _ in range(1000)]
    assert all(r.status_code == 200 for r in answers)  # the client reconnects by itself
    closes = sum(r.headers.get("connection") == "close" for r in answers)
    assert 1 <= closes <= 30, closes


def test_keepalive_requests_1_closes_every_connection(strict: str) -> None:
    with httpx.Client(base_url=strict, headers=AUTH) as c:
        answers = [c.get("/models"), c.get("/livez"), c.post("/sentiment/predict", json=TEXT)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(r.headers["connection"] == "close" for r in answers)
