"""ASGI middleware: clear messages for BentoML's validation errors, and connection recycling.

`ClearValidationErrors`: BentoML answers a request its pydantic models reject with 400 and
`{"error": "1 validation error for Input", "detail": [...]}`: the useful part is buried
in `detail`. This rewrites `error` to "images[0][3]: Input should be a valid number", and
leaves every other response untouched (it only buffers 400 bodies). Those 400s are also
counted in `dlserve_errors_total`, which the route handlers never see.

`RecycleConnections`: closes a keep-alive connection now and then, so that clients spread
evenly over the worker processes (its docstring says why).
"""

from __future__ import annotations

import random
from typing import Any

import orjson
from starlette.responses import Response

Scope = dict[str, Any]
Message = dict[str, Any]


def describe_validation_errors(detail: list[dict[str, Any]]) -> str:
    parts = []
    for err in detail[:5]:
        loc = [p for p in err.get("loc", []) if p not in ("root", "body")]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            msg = f"body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
        parts.append(f"{path}: {msg}" if path else msg)
    more = f" (and {len(detail) - 5} more)" if len(detail) > 5 else ""
    return "; ".join(parts) + more


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer (orjson); also an ASGI app, which is how the middlewares send it."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers=headers)


def count_error(path: str, reason: str) -> None:
    """Count a refusal the route handlers never see in dlserve_errors_total, by model."""
    from dlserve.settings import KNOWN_MODELS
    from service.metrics import get_metrics

    model = path.strip("/").split("/")[0]
    if model in KNOWN_MODELS:
        get_metrics().errors.labels(model=model, reason=reason).inc()


class ClearValidationErrors:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def wrapped_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] == 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                data = orjson.loads(body)
                if isinstance(data, dict) and isinstance(data.get("detail"), list):
                    count_error(scope["path"], "http_400")
                    data = {"error": describe_validation_errors(data["detail"]),
                            "detail": data["detail"]}
                    body = orjson.dumps(data)
            except orjson.JSONDecodeError:
                pass
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, wrapped_send)


class RecycleConnections:
    """Close about one keep-alive connection in `every` responses (`Connection: close`).

    Workers share one listening socket, and whichever is first to call accept() takes a
    new connection; a burst of connections can all land on one worker (all 64 of wrk's,
    in one run of ten here) and leave the other idle for as long as the clients keep
    their connections open. A client told to close reconnects at once and lands on
    whichever worker is free to accept, so the split evens out within seconds. Closing at
    random rather than every Nth request keeps connections that opened together from all
    reconnecting together. nginx's `keepalive_requests` is the same idea.
    """

    def __init__(self, app: Any, every: int) -> None:
        self.app = app
        self.every = every

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.every == 0 or random.randrange(self.every):
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)
