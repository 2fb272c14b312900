"""The one change dlserve makes to BentoML's HTTP stack, and why: two of the middlewares
BentoML wraps around every request are left out of the list it builds.

- `TimeoutMiddleware` (`traffic.timeout`) spawns a task and a timer per request and never
  cancels the timer, so a busy worker holds tens of thousands of live timers. The guard
  enforces the same timeout with `asyncio.timeout` (one timer, cancelled on answer;
  service/guard.py); dropping BentoML's as well served 3-8 % more single-image digits
  requests at 64 clients in side-by-side runs. BentoML's config cannot turn it off
  (`traffic.timeout` must be a positive number).
- `OpenTelemetryMiddleware`, unless DLSERVE_TRACING is on. With tracing off the service
  already tells it to exclude every URL, yet it still wraps each request and matches its
  URL against the exclusion: 10 % of a worker's samples under the digits cell (py-spy,
  one worker, 64 clients), for no span and no header (BentoML's X-BentoML-Request-ID
  comes from a span).

If a future BentoML moves things around, nothing breaks: the patch is skipped with a
warning, BentoML's stack applies as it is (service/internals.py lists the symbols), and
tests/test_internals.py and tests/test_bentoml_patches.py fail.
"""

from __future__ import annotations

import logging
from typing import Any

from service import internals

log = logging.getLogger("dlserve.service")


def bentoml_middlewares_to_drop(*, tracing: bool) -> tuple[type, ...]:
    """The classes of BentoML's middlewares that dlserve leaves out (none if BentoML no
    longer has them where this looks)."""
    timeout = internals.find(internals.TIMEOUT_MIDDLEWARE)
    if timeout is None:
        return ()
    try:  # a public class of OpenTelemetry's, which BentoML installs
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except ImportError:
        return (timeout,)
    return (timeout,) if tracing else (timeout, OpenTelemetryMiddleware)


def drop_bentoml_middlewares(*, tracing: bool) -> tuple[type, ...]:
    """Leave BentoML's TimeoutMiddleware, and its OpenTelemetryMiddleware unless `tracing`,
    out of every app it builds; the classes left out."""
    factory = internals.find(internals.APP_FACTORY)
    if factory is None:
        return ()
    dropped = bentoml_middlewares_to_drop(tracing=tracing)
    built = vars(factory).get("middlewares")
    if not dropped or not isinstance(built, property) or built.fget is None:
        log.warning("BentoML's middleware list has changed shape; leaving it as it is")
        return ()
    original = getattr(built.fget, "original", built.fget)  # imported again: patch anew

    def middlewares(self: Any) -> list[Any]:
        return [m for m in original(self) if m.cls not in dropped]

    middlewares.original = original  # type: ignore[attr-defined]
    factory.middlewares = property(middlewares)
    return dropped
