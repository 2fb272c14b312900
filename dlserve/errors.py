"""Errors that describe a bad input: each carries the HTTP status the service answers
with, and its message names the field and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class InputError(ValueError):
    """The client sent something we cannot use (HTTP 400)."""

    status = 400


class NotFound(InputError):
    """No such model, or not that version of it (HTTP 404)."""

    status = 404


class PayloadTooLarge(InputError):
    """Too many items, too many pixels, too many bytes (HTTP 413)."""

    status = 413


class UnsupportedMediaType(InputError):
    """A body in a format this route does not take (HTTP 415)."""

    status = 415


def check_item_list(items: object, field: str, *, expected: str, noun: str, max_items: int) -> None:
    """A request's list of items (or an array of them, a fast parse's): a non-empty list
    (400) of at most `max_items` (413)."""
    if not isinstance(items, list | np.ndarray) or not len(items):
        raise InputError(f"{field}: expected a non-empty list of {expected}")
    if len(items) > max_items:
        raise PayloadTooLarge(
            f"{field}: {len(items)} {noun} is more than the limit of {max_items} per request"
        )


def describe_validation_errors(errors: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """pydantic's errors as one line that names each field: "images[0][3]: Input should be
    a valid number"; a body that is no JSON at all says so."""
    parts = []
    for err in errors[:limit]:
        loc = err.get("loc", ())
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            msg = f"body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
            path = ""
        parts.append(f"{path}: {msg}" if path else msg)
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more
