"""The one change dlserve makes to BentoML's HTTP stack, and why.

BentoML wraps every request in its `TimeoutMiddleware` (`traffic.timeout`), which spawns a
task and a timer per request and never cancels the timer, so a busy worker holds tens of
thousands of live timers. The guard enforces the same timeout with `asyncio.timeout` (one
timer, cancelled on answer; service/guard.py); dropping BentoML's as well served 3-8 % more
single-image digits requests at 64 clients in side-by-side runs. BentoML's config cannot
turn it off (`traffic.timeout` must be a positive number), so this leaves it out of the
middleware list BentoML builds.

If a future BentoML moves things around, nothing breaks: the patch is skipped with a
warning, and BentoML's timeout (set to the same DLSERVE_REQUEST_TIMEOUT_S) applies too.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dlserve.service")


def drop_bentoml_timeout() -> None:
    """Leave BentoML's TimeoutMiddleware out of every app it builds."""
    try:
        from bentoml._internal.server.base_app import BaseAppFactory
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:
        log.warning("BentoML's TimeoutMiddleware not found; leaving BentoML's stack as it is")
        return
    built = BaseAppFactory.__dict__.get("middlewares")
    if not isinstance(built, property) or built.fget is None:
        log.warning("BentoML's middleware list has changed shape; leaving it as it is")
        return
    if getattr(built.fget, "drops_bentoml_timeout", False):
        return  # already done (the module was imported again)
    original = built.fget

    def middlewares(self: Any) -> list[Any]:
        return [m for m in original(self) if m.cls is not TimeoutMiddleware]

    middlewares.drops_bentoml_timeout = True  # type: ignore[attr-defined]
    BaseAppFactory.middlewares = property(middlewares)  # type: ignore[method-assign]
