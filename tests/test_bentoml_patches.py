"""service/bentoml_patches.py against the BentoML installed: the middlewares dlserve leaves
out are really gone from the app BentoML builds, and come back where asked for. A BentoML
upgrade that moves them fails here instead of quietly slowing every request down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# The service's app as `bentoml serve` builds it, and the middlewares it wraps requests in.
SHOW_STACK = """
import service.app
app = service.app.DLServe.to_asgi()
print(",".join(m.cls.__name__ for m in app.user_middleware))
"""


def middleware_stack(**env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SHOW_STACK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1].split(",")


@pytest.mark.parametrize("tracing", ["false", "true"])
def test_bentoml_timeout_and_idle_tracing_are_left_out(
    digits_model: str, sentiment_model: str, recommender_model: str, tracing: str
) -> None:
    stack = middleware_stack(DLSERVE_TRACING=tracing)
    assert "TimeoutMiddleware" not in stack  # the guard enforces the timeout
    assert ("OpenTelemetryMiddleware" in stack) == (tracing == "true"), stack
    # What stays: BentoML's request metrics (the dashboard's), then dlserve's guard.
    assert stack.index("RunnerTrafficMetricsMiddleware") < stack.index("RequestGuard")
