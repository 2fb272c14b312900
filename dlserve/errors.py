"""Errors that describe a bad input, shared by the service and the batch scorer.

Each carries the HTTP status the service answers with; the batch scorer reports the same
message per row. Messages name the field and what was expected.
"""

from __future__ import annotations


class InputError(ValueError):
    """The client sent something we cannot use (HTTP 400)."""

    status = 400


class PayloadTooLarge(InputError):
    """Too many items, too many pixels, too many bytes (HTTP 413)."""

    status = 413


class UnsupportedMediaType(InputError):
    """A body in a format this route does not take (HTTP 415)."""

    status = 415


def check_item_list(items: object, field: str, *, expected: str, noun: str,
                    max_items: int) -> None:
    """A request's list of items: a non-empty list (400) of at most `max_items` (413)."""
    if not isinstance(items, list) or not items:
        raise InputError(f"{field}: expected a non-empty list of {expected}")
    if len(items) > max_items:
        raise PayloadTooLarge(
            f"{field}: {len(items)} {noun} is more than the limit of {max_items} per request")
