"""Every private BentoML and uvicorn symbol dlserve uses, in one list, each with its use and
what happens without it.

BentoML and uvicorn give no public way to do what these do (drop a middleware from the
stack BentoML builds, find the metrics directory BentoML picks, choose uvicorn's protocol
class from inside a worker BentoML configures). An upgrade may move any of them, so each
is looked up here, by name, when it is needed: a symbol that has gone is logged as a
warning and the service starts without what it gave (each entry says what that costs).
tests/test_internals.py fails on an upgrade that moves one, before a user sees the warning.
The one exception is HttpToolsProtocol, which service/connections.py subclasses when it is
imported; uvicorn's upper bound in service/requirements.txt keeps it where it is.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dlserve.service")


@dataclass(frozen=True)
class Internal:
    module: str
    name: str  # an attribute of the module, dotted for one of a class
    used_by: str
    without_it: str  # what the service does if an upgrade moves it

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


TIMEOUT_MIDDLEWARE = Internal(
    "bentoml._internal.server.http.traffic",
    "TimeoutMiddleware",
    "service/bentoml_patches.py: left out of the stack (the guard times requests itself)",
    "BentoML's stack applies unchanged: a live timer per request, 3-8 % fewer digits req/s",
)
APP_FACTORY = Internal(
    "_bentoml_impl.server.app",
    "ServiceAppFactory",
    "service/bentoml_patches.py: its `middlewares` property wrapped to filter the stack",
    "BentoML's stack applies unchanged (as for TimeoutMiddleware)",
)
METRICS_DIR = Internal(
    "bentoml._internal.configuration.containers",
    "BentoMLContainer.prometheus_multiproc_dir",
    "service/lifecycle.py verify_metrics_dir: a read-only metrics directory refused at start",
    "PROMETHEUS_MULTIPROC_DIR is checked instead, or the check is skipped",
)
HTTP_PROTOCOLS = Internal(
    "uvicorn.config",
    "HTTP_PROTOCOLS",
    "service/connections.py install: uvicorn's 'auto' HTTP protocol made the guarded one",
    "uvicorn's own protocol serves: no header timeout, connection cap or lingering close",
)
HTTP_TOOLS_PROTOCOL = Internal(
    "uvicorn.protocols.http.httptools_impl",
    "HttpToolsProtocol",
    "service/connections.py: subclassed (GuardedHttpProtocol), using its cycle, flow, "
    "connections, loop and transport attributes",
    "none: imported with service/connections.py; uvicorn is bounded above for it",
)

INTERNALS = (TIMEOUT_MIDDLEWARE, APP_FACTORY, METRICS_DIR, HTTP_PROTOCOLS, HTTP_TOOLS_PROTOCOL)

# What GuardedHttpProtocol reads or overrides of HttpToolsProtocol (tests/test_internals.py
# checks that each is still there).
HTTP_TOOLS_MEMBERS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
)
HTTP_TOOLS_ATTRIBUTES = (
    "self.cycle",
    "self.flow",
    "self.connections",
    "self.transport",
    "self.loop",
)


def resolve(internal: Internal) -> Any:
    """The symbol, or an AttributeError/ImportError naming what moved."""
    found: Any = importlib.import_module(internal.module)
    for part in internal.name.split("."):
        found = getattr(found, part)
    return found


def find(internal: Internal) -> Any | None:
    """The symbol, or None with a warning that says what the service does without it."""
    try:
        return resolve(internal)
    except (ImportError, AttributeError) as exc:
        log.warning("%s not found (%s): %s", internal.qualname, exc, internal.without_it)
        return None
