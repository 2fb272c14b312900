"""Building JSON answers, and making BentoML's validation errors readable.

BentoML answers a request its pydantic models reject with 400 and
`{"error": "1 validation error for Input", "detail": [...]}`: the useful part is buried in
`detail`. `clarify_validation_error` rewrites `error` to "images[0][3]: Input should be a
valid number"; the guard (service/guard.py) applies it to every 400 on its way out and
counts it in `dlserve_errors_total`, which the route handlers never see.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


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


def clarify_validation_error(path: str, body: bytes) -> bytes:
    """The body of a 400, with BentoML's validation errors spelled out in `error` and
    counted in dlserve_errors_total (the routes never see them); any other 400 (our own
    `{"error": ...}` answers, counted where they are made) comes back as it was."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not (isinstance(data, dict) and isinstance(data.get("detail"), list)):
        return body
    count_error(path, "http_400")
    return orjson.dumps({"error": describe_validation_errors(data["detail"]),
                         "detail": data["detail"]})


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer (orjson); also an ASGI app, which is how the guard sends its refusals."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers=headers)


def count_error(path: str, reason: str) -> None:
    """Count a refusal the route handlers never see in dlserve_errors_total, by model."""
    from dlserve.settings import KNOWN_MODELS
    from service.metrics import get_metrics

    model = path.strip("/").split("/")[0]
    if model in KNOWN_MODELS:
        get_metrics().errors.labels(model=model, reason=reason).inc()
