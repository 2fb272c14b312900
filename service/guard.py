"""The first thing every request meets: API key, body type and size, and a concurrency cap.

Each check refuses at once, before the body is read into memory, with a JSON
`{"error": ...}` that names the problem and the setting behind the limit:

- 401 without the right `Authorization: Bearer <key>` when DLSERVE_API_KEY is set
  (compared in constant time; the open paths, by default /livez /readyz /metrics, need none);
- 415 for any pickle body, on every route, and for a body type the route does not take;
- 413 for a body over DLSERVE_MAX_BODY_BYTES: from Content-Length before reading anything,
  or, for a chunked body, as soon as the bytes received pass the limit;
- 429 + Retry-After once a worker has DLSERVE_MAX_CONCURRENCY requests in hand.

Threat model and settings: SECURITY.md.
"""

from __future__ import annotations

import hmac
from collections import deque
from typing import Any

from dlserve.settings import Settings, get_settings
from service.middleware import count_error, json_response

Scope = dict[str, Any]
Message = dict[str, Any]
Refusal = tuple[int, str, dict[str, str]]

# Routes that take a raw file rather than JSON, and the media types they accept.
FILE_ROUTES = {"/digits/predict_image": ("image/", "application/octet-stream")}
JSON_TYPES = ("application/json",)
# Health and metrics are cheap and must answer even when the predict routes are saturated.
UNCAPPED_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/healthz"})


def media_type(headers: dict[bytes, bytes]) -> str:
    return headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()


def _replay(messages: deque[Message], receive: Any) -> Any:
    """A receive() that hands back the messages already read, then defers to the real one."""
    async def replayed() -> Message:
        return messages.popleft() if messages else await receive()
    return replayed


class RequestGuard:
    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        settings = settings or get_settings()
        self.api_key = settings.api_key.encode()
        self.open_paths = frozenset(settings.open_paths)
        self.max_body = settings.max_body_bytes
        self.max_concurrency = settings.max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = (self.check_key(scope["path"], headers) or self.check_type(scope, headers)
                   or self.check_length(headers) or self.check_concurrency(scope["path"]))
        if refusal is not None:
            await self.refuse(refusal, scope, receive, send)
            return
        self.in_flight += 1
        try:
            if b"content-length" not in headers and b"chunked" in headers.get(
                    b"transfer-encoding", b"").lower():
                body = await self.read_chunked(receive)
                if body is None:
                    await self.refuse((413, f"request body is more than the limit of "
                                       f"{self.max_body} bytes (DLSERVE_MAX_BODY_BYTES)", {}),
                                      scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def refuse(refusal: Refusal, scope: Scope, receive: Any, send: Any) -> None:
        status, message, extra_headers = refusal
        count_error(scope["path"], f"http_{status}")
        await json_response({"error": message}, status, extra_headers)(scope, receive, send)

    def check_concurrency(self, path: str) -> Refusal | None:
        if path in UNCAPPED_PATHS or self.in_flight < self.max_concurrency:
            return None
        return (429, f"this worker already has {self.in_flight} requests in hand "
                f"(DLSERVE_MAX_CONCURRENCY={self.max_concurrency}); retry shortly",
                {"Retry-After": "1"})

    def check_key(self, path: str, headers: dict[bytes, bytes]) -> Refusal | None:
        if not self.api_key or path in self.open_paths:
            return None
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest takes as long whatever the key's first wrong byte: no timing oracle.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.api_key):
            return None
        return (401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                {"WWW-Authenticate": "Bearer"})

    @staticmethod
    def check_type(scope: Scope, headers: dict[bytes, bytes]) -> Refusal | None:
        kind = media_type(headers)
        if "pickle" in kind:
            return (415, f"Content-Type {kind} is refused: dlserve never unpickles client "
                    "data; send JSON", {})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        accepted = FILE_ROUTES.get(scope["path"], JSON_TYPES)
        if accepted is JSON_TYPES and kind in ("", *JSON_TYPES):
            return None
        if kind and any(kind.startswith(a) for a in accepted):
            return None
        return (415, f"Content-Type {kind or '(none)'} is not accepted by {scope['path']}; "
                f"send {' or '.join(a + '*' if a.endswith('/') else a for a in accepted)}", {})

    def check_length(self, headers: dict[bytes, bytes]) -> Refusal | None:
        raw = headers.get(b"content-length")
        if raw is None:
            return None
        if not raw.strip().isdigit():
            return (400, f"Content-Length {raw.decode('latin-1')!r} is not a byte count", {})
        if int(raw) > self.max_body:
            return (413, f"request body of {int(raw)} bytes is more than the limit of "
                    f"{self.max_body} bytes (DLSERVE_MAX_BODY_BYTES)", {})
        return None

    async def read_chunked(self, receive: Any) -> deque[Message] | None:
        """Read a chunked body, at most max_body bytes of it; None once it goes over."""
        messages: deque[Message] = deque()
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            if not message.get("more_body"):
                return messages
