"""What happens on a connection before and after the ASGI app sees a request: slow clients
cannot hold the server, and a refusal is read by the client it is meant for.

uvicorn (which BentoML runs) has no time limit on a request's headers: a connection that
sends a few bytes and then nothing is held forever, and a worker runs out of file
descriptors long before it runs out of CPU. And when the app answers before a request's
body has arrived (a 413), uvicorn closes the socket with the body still coming in; the
kernel then resets the connection, and a client that writes its whole body before
reading (Python's urllib, many embedded clients) sees a broken pipe, never the 413.

`GuardedHttpProtocol` is uvicorn's httptools protocol with, per connection:
- a header timeout (DLSERVE_HEADER_TIMEOUT_S): a request's headers, from its first byte,
  and a new connection's first request, from its accept, must arrive within it, else 408
  and close;
- a connection cap per worker (DLSERVE_MAX_CONNECTIONS): a connection beyond it is
  answered 503 + Retry-After at once and closed, instead of being held;
- a lingering close, as nginx's: when an answer ends the connection while the request's
  body is still coming, the server closes its side for writing, reads and discards what
  the client still sends (up to DLSERVE_LINGER_BYTES, for at most DLSERVE_LINGER_S), and
  only then closes, so the client reads the answer.
The body's own pace (an idle limit between reads, a minimum rate) is the guard's
(service/guard.py), which reads bodies before they count against the concurrency cap.
`install` makes it uvicorn's protocol for the worker; see its docstring for why a patch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

# A private class of uvicorn's (service/internals.py): bounded above in requirements.txt.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dlserve.settings import Settings, get_settings
from service import internals

log = logging.getLogger("dlserve.service")


def status_response(
    status: int,
    reason: str,
    message: str,
    retry_after: int | None = None,
) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, written without the app."""
    body = orjson.dumps({"error": message})
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _LingeringTransport:
    """The transport a request's cycle writes to: `close()` lingers (see the module)."""

    def __init__(self, protocol: GuardedHttpProtocol, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        cycle = self._protocol.cycle
        if cycle is not None and cycle.more_body and not self._transport.is_closing():
            self._protocol.linger()
        else:
            self._transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    settings: Settings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = get_settings()
        self.header_timer: asyncio.TimerHandle | None = None
        self.headers_since: float | None = None  # when the current request's first byte came
        self.lingering = False
        self.discarded = 0
        self.lingering_transport: _LingeringTransport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            transport.write(
                status_response(
                    503,
                    "Service Unavailable",
                    f"this worker already holds {self.settings.max_connections} connections "
                    "(DLSERVE_MAX_CONNECTIONS); retry shortly",
                    retry_after=1,
                )
            )
            transport.close()
            return
        self.lingering_transport = _LingeringTransport(self, transport)
        # A new connection's first request must arrive in time, sent or not.
        self.headers_since = self.loop.time()
        self._arm_header_timer(self.settings.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.discarded += len(data)
            if self.discarded > self.settings.linger_bytes:
                self.transport.close()
            return
        super().data_received(data)
        # Headers still incomplete after this read: time them from their first byte. Most
        # requests arrive whole in one read and never need a timer (a timer per request
        # cost 2-3 % of a worker's time under load).
        if self.headers_since is not None and self.header_timer is None:
            spent = self.loop.time() - self.headers_since
            self._arm_header_timer(max(0.0, self.settings.header_timeout_s - spent))

    def eof_received(self) -> None:
        if self.lingering:  # the client has sent all it will: the close can complete
            self.transport.close()
        return None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.headers_since is None:
            self.headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self.headers_since = None
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = self.lingering_transport  # type: ignore[assignment]

    def _arm_header_timer(self, delay: float) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(delay, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.headers_since is None:
            return  # the headers came in time
        self.transport.write(
            status_response(
                408,
                "Request Timeout",
                f"the request's headers did not arrive within {self.settings.header_timeout_s:g} "
                "seconds (DLSERVE_HEADER_TIMEOUT_S)",
            )
        )
        self.transport.close()

    def linger(self) -> None:
        """Close for writing now; close for good once the client stops sending."""
        self.lingering = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.settings.linger_s, self.transport.close)


def install() -> None:
    """Make GuardedHttpProtocol the protocol uvicorn serves HTTP/1.1 with in this process.

    BentoML builds each worker's `uvicorn.Config` itself, with no way to pass a protocol
    class; uvicorn resolves `http="auto"` through its HTTP_PROTOCOLS table when the server
    starts, after this module has been imported by the worker. So the table's "auto" entry
    is pointed here (tests/test_slow_clients.py fails if that stops taking effect).
    """
    protocols = internals.find(internals.HTTP_PROTOCOLS)
    if isinstance(protocols, dict):
        protocols["auto"] = f"{__name__}:GuardedHttpProtocol"
    elif protocols is not None:
        log.warning(
            "uvicorn's HTTP_PROTOCOLS is no longer a table; %s", internals.HTTP_PROTOCOLS.without_it
        )
