"""dlserve's one ASGI middleware, the first thing every request meets.

On the way in, it checks API key, body type and size, and a concurrency cap; each check
refuses at once, before the body is read into memory, with a JSON `{"error": ...}` that
names the problem and the setting behind the limit:

- 401 without the right `Authorization: Bearer <key>` when DLSERVE_API_KEY is set
  (compared in constant time; the open paths, by default the probes and /metrics, and the
  docs and demo pages' own files (service/pages.py) need none);
- 415 for any pickle body, on every route, and for a body type the route does not take
  (each route's content types are declared once, in its registry entry);
- 413 for a body over DLSERVE_MAX_BODY_BYTES: from Content-Length before reading anything,
  or, for a chunked body, as soon as the bytes received pass the limit;
- 408 for a body that pauses longer than DLSERVE_BODY_TIMEOUT_S, or, past its first
  DLSERVE_BODY_GRACE_S, averages under DLSERVE_MIN_BODY_RATE bytes/s (a request's headers
  are timed by service/connections.py, before this layer sees the request);
- 429 + Retry-After once a worker has DLSERVE_MAX_CONCURRENCY requests in hand; a request
  counts only once its body is in, so that slow uploads cannot fill the cap;
- 503 + Retry-After for a predict or infer request that cannot start its model run before
  its deadline: DLSERVE_REQUEST_TIMEOUT_S after its body's arrival, or sooner when the
  client sends `Request-Timeout: <seconds>` (400 when that is not a positive number); 504
  for one still being prepared, or whose model run had started, when the deadline came.

While a predict or infer request waits (its input being prepared, its place in the queue,
its model run), the guard listens for the client's `http.disconnect`: a client that hangs
up has its request cancelled, which withdraws its queued work before any batch is started
for it (service/batching.py), and counts it in dlserve_requests_abandoned_total.

A POST to a predict route, or to the Open Inference Protocol's infer route, is then
answered here (service/predict.py, service/protocol.py), with the body read within the
limit; everything else (GET /models, the probes, /metrics, the docs) goes on to BentoML.
With DLSERVE_PAYLOAD_LOG set, each such request and its answer are handed to the payload
log (service/payload_log.py), which adds `X-Request-Id` to the answer.
Answering here rather than in BentoML's endpoint skips its router, its input model, its
context and its serialisation: digits, one JSON image per request, 64 clients, 2
workers, 3 rounds of 20 s side by side, went from 4,572 to 8,330 requests/s (median) and
p99 from 24 to 14 ms. BentoML's metrics middleware still sees every request.

On the way out, it closes about one keep-alive connection in
DLSERVE_KEEPALIVE_REQUESTS (`edit_responses` says why). One layer does all of it because
every ASGI layer costs each request a call and a wrapped send(). The timeout is here, not
BentoML's (`traffic.timeout`), for the same reason: BentoML's spawns a task and a timer per
request and never cancels the timer; `asyncio.timeout` here costs a timer, cancelled on
answer. One layer instead of three, and this timeout, served 4 % more single-image digits
requests at 64 clients (8 rounds side by side).

Threat model and settings: SECURITY.md.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import re
import time
import weakref
from collections import deque
from typing import Any

from starlette.types import Message, Scope, Send

from dlserve.registry import JSON, Route
from dlserve.settings import HEALTH_PATHS, Settings, get_settings
from service import predict, protocol, repository
from service.batching import Call
from service.metrics import get_metrics
from service.pages import is_page
from service.state import WorkerState, current

Refusal = tuple[int, str, dict[str, str]]
Routes = dict[str, tuple[str, Route]]  # path → (model, route)
# Refusals of a body end its connection: the rest of the body is not worth reading
# (service/connections.py reads and discards it for a while, so the client sees the answer).
CLOSE = {"Connection": "close"}
# The probes and the metrics must answer even when the predict routes are saturated.
UNCAPPED_PATHS = frozenset(HEALTH_PATHS)
# The client's own deadline for a predict or infer request, in seconds (a decimal number);
# the server's DLSERVE_REQUEST_TIMEOUT_S caps it. Named after gRPC's grpc-timeout and the
# Request-Timeout proposals; documented in docs/http-api.md, "Deadlines and clients that hang up".
DEADLINE_HEADER = b"request-timeout"
# This process's guards: a worker has one (Starlette builds its middleware stack once,
# before the service instance exists, so the instance cannot be handed it).
_GUARDS: weakref.WeakSet[RequestGuard] = weakref.WeakSet()


def media_type(headers: dict[bytes, bytes]) -> str:
    return headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()


def _replay(messages: deque[Message], receive: Any) -> Any:
    """A receive() that hands back the messages already read, then defers to the real one."""

    async def replayed() -> Message:
        return messages.popleft() if messages else await receive()

    return replayed


def requests_in_flight() -> int:
    """Requests this worker's guard has in hand now (RequestGuard.in_flight), for the demand
    gauges (service/metrics.py, sample_demand): read by their thread, not counted again."""
    return sum(guard.in_flight for guard in _GUARDS)


class RequestGuard:
    def __init__(self, app: Any, routes: Routes, settings: Settings | None = None) -> None:
        self.app = app
        self.routes = routes
        self.models = {model for model, _ in routes.values()}
        settings = settings or get_settings()
        self.api_key = settings.api_key.encode()
        self.open_paths = frozenset(settings.open_paths)
        self.pages_open = settings.docs
        self.max_body = settings.max_body_bytes
        self.max_concurrency = settings.max_concurrency
        self.recycle_every = settings.keepalive_requests
        self.timeout_s = settings.request_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.body_grace_s = settings.body_grace_s
        self.min_body_rate = settings.min_body_rate
        # A failed load waits again while the version before is put back.
        self.rollout_timeout_s = 2 * settings.rollout_timeout_s + 10
        self.in_flight = 0
        self.state: WorkerState | None = None  # the worker's, found on first use
        _GUARDS.add(self)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        refusal = (
            self.check_key(path, headers)
            or self.check_type(scope, headers)
            or self.check_length(headers)
            or self.check_deadline(headers)
        )
        if refusal is not None:
            await self.refuse(refusal, scope, receive, send)
            return
        post = scope["method"] == "POST"
        target = self.routes.get(path) if post else None
        infer = protocol.INFER.match(path) if post and target is None else None
        chunked = (
            b"content-length" not in headers
            and b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        )
        messages = None
        if target is not None or infer is not None or chunked:
            # Read before the request counts against the cap: a slow body holds a
            # connection, never a place that fast requests need (SECURITY.md).
            read = await self.read_body(receive)
            if not isinstance(read, deque):
                await self.refuse(read, scope, receive, send)
                return
            if read[-1]["type"] != "http.request":
                # The client went away before its whole body was read (a busy worker
                # reads slowly): nothing of it ran; counted like a hang-up while prepared.
                model = target[0] if target else infer["name"] if infer else None
                if model in self.models:
                    get_metrics().abandoned.labels(model=model, stage="preparing").inc()
                return
            messages = read
        refusal = self.check_concurrency(path)
        if refusal is not None:
            await self.refuse(refusal, scope, receive, send)
            return
        self.in_flight += 1
        timeout_s, source = self.timeout_s, "DLSERVE_REQUEST_TIMEOUT_S"
        if path.startswith(repository.PREFIX):  # a load waits for every worker to switch
            timeout_s, source = self.rollout_timeout_s, "DLSERVE_ROLLOUT_TIMEOUT_S and a margin"
        call = None
        if target is not None or infer is not None:
            raw = headers.get(DEADLINE_HEADER)  # check_deadline has found it a number
            asked = float(raw) if raw is not None else timeout_s
            if asked < timeout_s:
                timeout_s, source = asked, "its Request-Timeout header"
            call = Call(deadline=time.perf_counter() + timeout_s)
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                edited = self.edit_responses(send, deadline)
                if messages is None:
                    await self.app(scope, receive, edited)
                elif call is None:
                    await self.app(scope, _replay(messages, receive), edited)
                else:
                    await self.answer(
                        scope, receive, edited, headers, messages, target, infer, call
                    )
        except TimeoutError:
            if not deadline.expired():
                raise  # the app's own, not the deadline's
            # The answer had not begun (edit_responses lifts the deadline once it does).
            if call is not None and call.stage == "queued":
                await self.refuse(
                    (
                        503,
                        f"the request could not start within {timeout_s:g} "
                        f"seconds ({source}): the model's queue is too long; retry "
                        "shortly",
                        {"Retry-After": "1"},
                    ),
                    scope,
                    receive,
                    send,
                    reason="deadline",
                )
            else:
                await self.refuse(
                    (
                        504,
                        f"the request was not answered within {timeout_s:g} seconds ({source})",
                        {},
                    ),
                    scope,
                    receive,
                    send,
                )
        finally:
            self.in_flight -= 1

    async def answer(
        self,
        scope: Scope,
        receive: Any,
        send: Send,
        headers: dict[bytes, bytes],
        messages: deque[Message],
        target: tuple[str, Route] | None,
        infer: re.Match[str] | None,
        call: Call,
    ) -> None:
        """A predict request (service/predict.py) or an infer request (service/protocol.py),
        cancelled if its client hangs up before the answer is ready."""
        state = self.state or current()
        self.state = state
        body = b"".join(m.get("body", b"") for m in messages)
        logged = None
        if state.payload_log is not None:  # None unless DLSERVE_PAYLOAD_LOG is set
            model = target[0] if target is not None else infer["name"] if infer else ""
            logged = state.payload_log.start(scope["path"], model, headers, body)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task, call))
        try:
            if target is not None:
                response = await predict.answer(state, target[0], target[1], body, call)
            else:
                assert infer is not None
                response = await protocol.infer(
                    state, infer["name"], infer["version"], headers, body, call
                )
        except asyncio.CancelledError:
            if not call.gone:
                raise  # the deadline's, or the server stopping
            task.uncancel()  # ours: nobody is left to answer
            return
        finally:
            watcher.cancel()
        if logged is not None:
            logged.finish(response)  # queued for the writer thread; adds X-Request-Id
        await response(scope, receive, send)

    def edit_responses(self, send: Send, deadline: asyncio.Timeout) -> Send:
        """send(), with the deadline lifted once the answer begins and, about once in
        `recycle_every` responses, `Connection: close` added.

        Why close connections: workers share one listening socket, and whichever is first
        to call accept() takes a new connection; a burst of connections can all land on
        one worker (all 64 of wrk's, in one run of ten here) and leave the other idle for
        as long as the clients keep their connections open. A client told to close
        reconnects at once and lands on whichever worker is free to accept, so the split
        evens out within seconds. Closing at random rather than every Nth request keeps
        connections that opened together from all reconnecting together. nginx's
        `keepalive_requests` is the same idea.
        """
        close = self.recycle_every > 0 and random.randrange(self.recycle_every) == 0

        async def edited_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                deadline.reschedule(None)
                if close:
                    message = {
                        **message,
                        "headers": [*message["headers"], (b"connection", b"close")],
                    }
            await send(message)

        return edited_send

    async def refuse(
        self, refusal: Refusal, scope: Scope, receive: Any, send: Any, reason: str | None = None
    ) -> None:
        """Answer with the refusal, counted in dlserve_errors_total under its route's model
        (reason: `http_<status>`, or the one given; `deadline` also counts as shed)."""
        status, message, extra_headers = refusal
        target = self.routes.get(scope["path"])
        infer = protocol.INFER.match(scope["path"])
        model = target[0] if target else infer["name"] if infer else None
        if model in self.models:
            metrics = get_metrics()
            metrics.errors.labels(model=model, reason=reason or f"http_{status}").inc()
            if reason == "deadline":
                metrics.shed.labels(model=model, reason=reason).inc()
        await predict.json_response({"error": message}, status, extra_headers)(scope, receive, send)

    def check_concurrency(self, path: str) -> Refusal | None:
        if path in UNCAPPED_PATHS or self.in_flight < self.max_concurrency:
            return None
        return (
            429,
            f"this worker already has {self.in_flight} requests in hand "
            f"(DLSERVE_MAX_CONCURRENCY={self.max_concurrency}); retry shortly",
            {"Retry-After": "1"},
        )

    def check_key(self, path: str, headers: dict[bytes, bytes]) -> Refusal | None:
        if not self.api_key or path in self.open_paths or (self.pages_open and is_page(path)):
            return None
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest takes as long whatever the key's first wrong byte: no timing oracle.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.api_key):
            return None
        return (
            401,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
            {"WWW-Authenticate": "Bearer"},
        )

    def check_type(self, scope: Scope, headers: dict[bytes, bytes]) -> Refusal | None:
        kind = media_type(headers)
        if "pickle" in kind:
            return (
                415,
                f"Content-Type {kind} is refused: dlserve never unpickles client data; send JSON",
                {},
            )
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        target = self.routes.get(scope["path"])
        if target is not None:
            accepted = target[1].content_types
            ok = target[1].accepts(kind)
        elif protocol.INFER.match(scope["path"]):
            accepted = protocol.CONTENT_TYPES[1:]
            ok = kind in protocol.CONTENT_TYPES
        else:
            accepted, ok = (JSON,), kind in ("", JSON)
        if ok:
            return None
        return (
            415,
            f"Content-Type {kind or '(none)'} is not accepted by {scope['path']}; "
            f"send {' or '.join(accepted)}",
            {},
        )

    def check_deadline(self, headers: dict[bytes, bytes]) -> Refusal | None:
        raw = headers.get(DEADLINE_HEADER)
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if seconds > 0 and math.isfinite(seconds):
            return None
        return (
            400,
            f"Request-Timeout {raw.decode('latin-1')!r} is not a positive number of seconds",
            {},
        )

    def check_length(self, headers: dict[bytes, bytes]) -> Refusal | None:
        raw = headers.get(b"content-length")
        if raw is None:
            return None
        if not raw.strip().isdigit():
            return (400, f"Content-Length {raw.decode('latin-1')!r} is not a byte count", {})
        if int(raw) > self.max_body:
            return (
                413,
                f"request body of {int(raw)} bytes is more than the limit of "
                f"{self.max_body} bytes (DLSERVE_MAX_BODY_BYTES)",
                CLOSE,
            )
        return None

    async def read_body(self, receive: Any) -> deque[Message] | Refusal:
        """The body's messages, or the refusal that ends it: 413 once it passes max_body
        (a chunked body can go over what no Content-Length announced), 408 when it pauses
        longer than body_timeout_s or, past body_grace_s, averages under min_body_rate.
        The last message is not an `http.request` when the client went away."""
        messages: deque[Message] = deque()
        loop = asyncio.get_running_loop()
        started = loop.time()
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                return (
                    408,
                    f"no body bytes for {self.body_timeout_s:g} seconds (DLSERVE_BODY_TIMEOUT_S)",
                    CLOSE,
                )
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.max_body:
                return (
                    413,
                    f"request body is more than the limit of {self.max_body} bytes "
                    "(DLSERVE_MAX_BODY_BYTES)",
                    CLOSE,
                )
            if not message.get("more_body"):
                return messages
            elapsed = loop.time() - started
            if elapsed > self.body_grace_s and size < self.min_body_rate * elapsed:
                return (
                    408,
                    f"the body arrives at {size / elapsed:,.0f} bytes/s, under the "
                    f"minimum of {self.min_body_rate:,} (DLSERVE_MIN_BODY_RATE)",
                    CLOSE,
                )


async def _watch_disconnect(receive: Any, task: asyncio.Task[Any], call: Call) -> None:
    """Cancel `task` when the client hangs up. The body has been read, so the next message
    uvicorn hands out is the disconnect (it is cancelled before the answer is sent)."""
    if (await receive())["type"] == "http.disconnect":
        call.gone = True
        task.cancel()
