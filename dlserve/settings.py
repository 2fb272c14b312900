"""Every environment variable dlserve reads, in one validated object.

Read once per process with `get_settings()`. A bad value fails at start with a message
that names the variable, instead of surfacing later as an obscure error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

KNOWN_MODELS = ("digits", "sentiment", "recommender")

# Official sources (see README "Data"). Each is a base URL or a file URL that the
# matching DLSERVE_*_URL variable can replace, for a mirror or a local server.
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"


class SettingsError(ValueError):
    """An environment variable holds a value dlserve cannot use."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default=Path("data"), metadata={"env": "DLSERVE_DATA_DIR"})
    artifacts_dir: Path = field(
        default=Path("artifacts"), metadata={"env": "DLSERVE_ARTIFACTS_DIR"}
    )
    models: tuple[str, ...] = field(default=KNOWN_MODELS, metadata={"env": "DLSERVE_MODELS"})
    # Execution providers to try, in order ("tensorrt,cuda,cpu"); empty means all of them.
    providers: tuple[str, ...] = field(default=(), metadata={"env": "DLSERVE_PROVIDERS"})
    ort_threads: int = field(default=1, metadata={"env": "DLSERVE_ORT_THREADS"})
    # Worker processes, each with its own copy of the models and its own batcher. One per
    # core served best on the benchmark machine (BENCHMARKS.md, "Worker processes").
    workers: int = field(default=len(os.sched_getaffinity(0)), metadata={"env": "DLSERVE_WORKERS"})
    port: int = field(default=3000, metadata={"env": "DLSERVE_PORT"})
    # BentoML's per-request access log and OpenTelemetry spans; both cost more per request
    # than the models do (see BENCHMARKS.md), so they are off unless turned on.
    access_log: bool = field(default=False, metadata={"env": "DLSERVE_ACCESS_LOG"})
    tracing: bool = field(default=False, metadata={"env": "DLSERVE_TRACING"})
    # Adaptive batching: a batch runs as soon as the model is free, with whatever is queued
    # (up to max_batch_size items); batch_wait_ms optionally holds a lone request back a
    # little so that others can join it.
    batching: bool = field(default=True, metadata={"env": "DLSERVE_BATCHING"})
    max_batch_size: int = field(default=64, metadata={"env": "DLSERVE_MAX_BATCH_SIZE"})
    batch_wait_ms: float = field(default=0.0, metadata={"env": "DLSERVE_BATCH_WAIT_MS"})
    # Items queued per worker and model before new requests get 503 + Retry-After: a bound
    # on memory and on waiting (4,096 digits are ~0.1 s of work, 4,096 texts ~3 s).
    max_queue_items: int = field(default=4096, metadata={"env": "DLSERVE_MAX_QUEUE_ITEMS"})
    # Each response closes its keep-alive connection with probability 1/keepalive_requests
    # (0: never), so that connections spread evenly over the workers (see
    # service/guard.py, RequestGuard.edit_responses, and BENCHMARKS.md).
    keepalive_requests: int = field(default=100, metadata={"env": "DLSERVE_KEEPALIVE_REQUESTS"})
    max_items_per_request: int = field(default=256, metadata={"env": "DLSERVE_MAX_ITEMS"})
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"env": "DLSERVE_MAX_IMAGE_PIXELS"}
    )
    # Longest text accepted by /sentiment/predict, in characters (longer → 413). Only the
    # first max_tokens tokens of a text are read, so this bounds tokenising work, not the model.
    max_text_chars: int = field(default=100_000, metadata={"env": "DLSERVE_MAX_TEXT_CHARS"})
    # Most ratings one /recommender request may carry (more → 413); a user rates each movie
    # at most once, so this only needs to exceed the catalogue for the largest users.
    max_ratings: int = field(default=10_000, metadata={"env": "DLSERVE_MAX_RATINGS"})
    # Hardening (SECURITY.md). The largest request body, refused with 413 before it is read
    # (from Content-Length, or while a chunked body streams in).
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"env": "DLSERVE_MAX_BODY_BYTES"})
    # Requests each worker handles at once; more get 429 + Retry-After at once. Together with
    # max_body_bytes this bounds the memory that request bodies can take.
    max_concurrency: int = field(default=256, metadata={"env": "DLSERVE_MAX_CONCURRENCY"})
    # A request not answered within this many seconds gets 504 (its queued work is dropped).
    request_timeout_s: float = field(default=30.0, metadata={"env": "DLSERVE_REQUEST_TIMEOUT_S"})
    # When set, every route except open_paths needs `Authorization: Bearer <key>` (else 401).
    api_key: str = field(default="", repr=False, metadata={"env": "DLSERVE_API_KEY"})
    open_paths: tuple[str, ...] = field(
        default=("/livez", "/readyz", "/metrics"), metadata={"env": "DLSERVE_OPEN_PATHS"})
    # On SIGTERM a worker first reports not-ready for drain_delay_s while still serving (so
    # load balancers stop sending it traffic), then stops accepting and finishes in-flight
    # requests; it exits at the latest drain_timeout_s after the signal.
    drain_delay_s: float = field(default=5.0, metadata={"env": "DLSERVE_DRAIN_DELAY_S"})
    drain_timeout_s: float = field(default=25.0, metadata={"env": "DLSERVE_DRAIN_TIMEOUT_S"})
    # The MovieLens folder inside the data directory (or an absolute path): the 100K layout
    # (u.data, u.item, u1.base, u1.test) or a newer release's ratings.csv and movies.csv.
    movielens: str = field(default="ml-100k", metadata={"env": "DLSERVE_MOVIELENS"})
    mnist_url: str = field(default=MNIST_URL, metadata={"env": "DLSERVE_MNIST_URL"})
    sst2_url: str = field(default=SST2_URL, metadata={"env": "DLSERVE_SST2_URL"})
    movielens_url: str = field(default=MOVIELENS_URL, metadata={"env": "DLSERVE_MOVIELENS_URL"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in KNOWN_MODELS]
        if unknown or not self.models:
            raise SettingsError(
                f"DLSERVE_MODELS: unknown model(s) {unknown or '(none given)'}; "
                f"choose from {', '.join(KNOWN_MODELS)}"
            )
        for name in ("ort_threads", "workers", "max_batch_size", "max_queue_items",
                     "max_items_per_request", "max_image_pixels", "max_text_chars", "max_ratings",
                     "max_body_bytes", "max_concurrency"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{_env_name(name)}: must be at least 1")
        if self.keepalive_requests < 0:
            raise SettingsError("DLSERVE_KEEPALIVE_REQUESTS: must be 0 (never close) or more")
        if self.batch_wait_ms < 0:
            raise SettingsError("DLSERVE_BATCH_WAIT_MS: must be 0 or more")
        if self.request_timeout_s <= 0:
            raise SettingsError("DLSERVE_REQUEST_TIMEOUT_S: must be more than 0")
        if not 0 <= self.drain_delay_s < self.drain_timeout_s:
            raise SettingsError("DLSERVE_DRAIN_DELAY_S: must be 0 or more and less than "
                                "DLSERVE_DRAIN_TIMEOUT_S")


def _env_name(attr: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == attr)


def _parse(raw: str, default: object, env: str) -> object:
    raw = raw.strip()
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise SettingsError(f"{env}: expected {kind}, got {raw!r}") from None
    if isinstance(default, Path):
        return Path(raw).expanduser()
    if isinstance(default, tuple):
        return tuple(p.strip().lower() for p in raw.split(",") if p.strip())
    return raw


def settings_from_env(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from environment variables; keyword overrides win (CLI flags)."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(Settings):
        env = f.metadata["env"]
        if env in environ and environ[env] != "":
            values[f.name] = _parse(environ[env], f.default, env)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]


@cache
def get_settings() -> Settings:
    return settings_from_env()
