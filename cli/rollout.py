"""`dlserve rollout`, `rollback` and `versions`: a running server's model repository routes
(service/repository.py), for people.

They talk HTTP only, never to the model store: the server is what knows which version
serves and which served before, and it checks a version before any worker switches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from dlserve.settings import Settings

URL_ENV = "DLSERVE_URL"
# Metric names that say how good a version is; the rest (epochs, timings, sizes) do not.
QUALITY = ("accuracy", "rmse", "mae", "f1", "auc")


class ServerError(Exception):
    """A call to the server failed; the message is the line to print."""


class Repository:
    """The model repository routes of the server at `url`."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # A load that fails waits up to rollout_timeout_s for the workers, then as long again
        # for them to put back the version before, and only then answers why.
        self.timeout_s = settings.rollout_timeout_s * 2 + 10

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """The JSON answer to POST `path`, or ServerError with the server's message."""
        try:
            r = httpx.post(
                f"{self.url}/v2/repository/{path}",
                json=body,
                headers=self.headers,
                timeout=self.timeout_s,
            )
        except httpx.ConnectError:
            raise ServerError(
                f"no server answers at {self.url} (give its address with --url or ${URL_ENV})"
            ) from None
        except httpx.TimeoutException:
            raise ServerError(f"{self.url} did not answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}: {exc}") from None
        if r.status_code != 200:
            raise ServerError(f"HTTP {r.status_code}: {_message(r)}")
        try:
            return r.json()
        except ValueError:
            raise ServerError(f"{self.url} answered no JSON: is it a dlserve server?") from None

    def load(self, model: str, parameters: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.post(f"models/{model}/load", {"parameters": parameters})
        return answer

    def versions(self, model: str) -> list[dict[str, Any]]:
        """The index's entries for `model`, newest first (as the server lists them)."""
        entries: list[dict[str, Any]] = self.post("index", {})
        mine = [e for e in entries if e.get("name") == model]
        if not mine:
            served = sorted({str(e.get("name")) for e in entries})
            raise ServerError(
                f"{self.url} serves no model {model!r} (it serves: {', '.join(served) or 'none'})"
            )
        return mine


def _message(r: httpx.Response) -> str:
    """The server's `{"error": ...}`, or the start of whatever else it answered."""
    try:
        message = str(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = r.text.strip()[:200] or r.reason_phrase
    if r.status_code == 401:
        message += f" (this command sends the key in ${Settings.env_name('api_key')})"
    return message


def _repository(args: argparse.Namespace, settings: Settings) -> Repository:
    url = args.url or os.environ.get(URL_ENV) or f"http://localhost:{settings.port}"
    return Repository(url, settings)


def _answer(action: Callable[[], str]) -> int:
    """Print what `action` returns; a ServerError is one line on stderr and exit status 2."""
    try:
        print(action())
    except ServerError as exc:
        print(f"dlserve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _loaded(answer: dict[str, Any]) -> str:
    """`digits: digits:abc → digits:def, served by 2 workers`."""
    model, version, workers = answer["model"], answer["version"], answer["workers"]
    if answer.get("canary"):
        return (
            f"{model}: {answer['canary']} on {answer['canary_percent']:g} % of requests, "
            f"{version} on the rest, in {workers} workers"
        )
    if answer.get("previous") == version:
        return f"{model}: {version} already served, by {workers} workers"
    return f"{model}: {answer.get('previous') or 'none'} → {version}, served by {workers} workers"


def cmd_rollout(args: argparse.Namespace, settings: Settings) -> int:
    repository = _repository(args, settings)
    parameters: dict[str, Any] = {} if args.version is None else {"version": args.version}
    if args.canary is not None:
        parameters["canary_percent"] = args.canary
    return _answer(lambda: _loaded(repository.load(args.model, parameters)))


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    repository = _repository(args, settings)
    return _answer(lambda: _loaded(repository.load(args.model, {"rollback": True})))


def cmd_versions(args: argparse.Namespace, settings: Settings) -> int:
    repository = _repository(args, settings)
    render: Callable[[list[dict[str, Any]]], str] = json.dumps if args.json else table
    return _answer(lambda: render(repository.versions(args.model)))


def table(entries: list[dict[str, Any]]) -> str:
    """One row per version: which serves and which served before, its precision, creation
    time, state and quality metrics."""
    header = ("", "VERSION", "PRECISION", "CREATED", "STATE", "METRICS")
    rows = [header] + [
        (
            "serving" if e["state"] == "READY" else "previous" if e["previous"] else "",
            e["version"],
            e["precision"],
            _created(e["created_at"]),
            e["state"],
            key_metrics(e["metrics"]),
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _created(iso: str) -> str:
    """The creation time in this machine's time zone, to the second."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def key_metrics(metrics: dict[str, Any]) -> str:
    """`test_accuracy_torch=0.9865`; for a precision variant, its own measured metric
    beside its FP32 parent's (the top-level ones are the parent's)."""
    check = metrics.get("precision_check")
    if isinstance(check, dict) and {"metric", "variant", "fp32"} <= check.keys():
        return f"{check['metric']}={check['variant']:.4f} (fp32 {check['fp32']:.4f})"
    return " ".join(
        f"{key}={value:.4g}"
        for key, value in metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and any(q in key.lower() for q in QUALITY)
    )
