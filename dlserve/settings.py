"""Every environment variable dlserve reads, in one validated object (pydantic-settings).

Read once per process with `get_settings()`; the CLI passes its flags as keyword
overrides to `load_settings`. A bad value fails at start with a message that names the
variable (`DLSERVE_WORKERS: expected int, got 'two'`) instead of surfacing later as an
obscure error. Each field's env name is `DLSERVE_` + its name in capitals.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dlserve.allocator import Choice as AllocatorChoice
from dlserve.catalog import registered
from dlserve.manifest import Precision
from dlserve.providers import resolve_providers

PREFIX = "DLSERVE_"
# The probes and the metrics: they need no API key (by default) and are never refused for
# being over the concurrency cap, since they must answer while the predict routes are busy.
HEALTH_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready")

# Official sources (see docs/models.md, "Data"). Each is a base URL or a file URL that the
# matching DLSERVE_*_URL variable can replace, for a mirror or a local server.
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"

CommaList = Annotated[tuple[str, ...], NoDecode]  # "a,b" in the environment, not JSON
# Settings a hostile client can push against; SECURITY.md documents each of them.
SECURITY: JsonDict = {"security": True}


class SettingsError(ValueError):
    """An environment variable holds a value dlserve cannot use."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, frozen=True, extra="ignore"
    )

    data_dir: Path = Path("data")
    artifacts_dir: Path = Path("artifacts")
    models: CommaList = ()  # empty: every registered model
    # Importable modules that register more models (each defines MODEL, a ModelSpec),
    # beside the built-in ones: how a model from outside this repository is added.
    model_modules: CommaList = ()
    # Execution providers to try, in order ("cuda,cpu"); "auto" (or empty): TensorRT, then
    # CUDA, then the CPU, keeping the first that really initialises (dlserve/runtime.py).
    providers: CommaList = ()
    # Fail start-up, naming the model and why, rather than run on the CPU when no GPU
    # provider works (a GPU node whose driver or libraries are broken).
    require_gpu: bool = False
    # Intra-op threads per ONNX Runtime session; unset: the cores divided among the
    # workers, at least 1 (so that workers do not fight over cores).
    ort_threads: int | None = Field(None, ge=1)
    # Which variant of each model the service, eval, bench and score load when no version
    # is named: the latest model-store version exported with this precision.
    precision: Precision = "fp32"
    # ONNX Runtime's CPU memory arena: it keeps the largest run's memory for the life of the
    # session (~1 GiB per worker after one burst of long texts), so it is off; memory-pattern
    # planning stays on. Measured in BENCHMARKS.md, "Memory" (`dlserve bench --only memory`).
    ort_cpu_mem_arena: bool = False
    ort_mem_pattern: bool = True
    # Every this many seconds a worker hands the memory its allocator holds free back to
    # the system (glibc's malloc_trim; 0: never). glibc keeps what a burst freed inside its
    # per-thread arenas: in a 10-minute soak with bursts each worker grew 258 → 300 MiB,
    # and one malloc_trim took it to 242-255 MiB. See service/lifecycle.py.
    malloc_trim_s: float = Field(30.0, ge=0, le=3600)
    # The server's memory allocator (dlserve/allocator.py): auto preloads jemalloc where it
    # is installed (Debian: libjemalloc2), which gives a burst's memory back by itself;
    # jemalloc requires it; system keeps glibc's malloc, trimmed as above.
    allocator: AllocatorChoice = "auto"
    # TensorRT's engine and timing caches; unset: a trt-cache folder beside each model.
    trt_cache_dir: Path | None = None
    # Let TensorRT pick FP16 kernels for an FP32 model (an FP16 variant is FP16 anyway).
    trt_fp16: bool = False
    cuda_device_id: int = Field(0, ge=0)
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kSameAsRequested"
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    # Worker processes, each with its own copy of the models and its own batcher. One per
    # core served best on the benchmark machine (BENCHMARKS.md, "Worker processes").
    workers: int = Field(default_factory=lambda: len(os.sched_getaffinity(0)), ge=1)
    port: int = 3000
    # The Open Inference Protocol over gRPC (service/grpc_server.py): every worker serves it
    # on this port (shared with SO_REUSEPORT), Triton's and KServe's default; 0 turns it off.
    grpc_port: int = Field(8001, ge=0, le=65535)
    # BentoML's per-request access log and OpenTelemetry spans; both cost more per request
    # than the models do (see BENCHMARKS.md), so they are off unless turned on.
    access_log: bool = False
    tracing: bool = False
    # Adaptive batching: a batch runs as soon as the model is free, with whatever is queued
    # (up to max_batch_size items); batch_wait_ms optionally holds a lone request back a
    # little so that others can join it.
    batching: bool = True
    max_batch_size: int = Field(64, ge=1)
    batch_wait_ms: float = Field(0.0, ge=0)
    # Items queued per worker and model before new requests get 503 + Retry-After: a bound
    # on memory and on waiting (4,096 digits are ~0.1 s of work, 4,096 texts ~3 s).
    max_queue_items: int = Field(4096, ge=1, json_schema_extra=SECURITY)
    # Each response closes its keep-alive connection with probability 1/keepalive_requests
    # (0: never), so that connections spread evenly over the workers (see
    # service/guard.py, RequestGuard.edit_responses, and BENCHMARKS.md).
    keepalive_requests: int = Field(100, ge=0)
    max_items: int = Field(256, ge=1, json_schema_extra=SECURITY)
    max_image_pixels: int = Field(4096 * 4096, ge=1, json_schema_extra=SECURITY)
    # Longest text accepted by /sentiment/predict, in characters (longer → 413). Only the
    # first max_tokens tokens of a text are read, so this bounds tokenising work, not the model.
    max_text_chars: int = Field(100_000, ge=1, json_schema_extra=SECURITY)
    # Most ratings one /recommender request may carry (more → 413); a user rates each movie
    # at most once, so this only needs to exceed the catalogue for the largest users.
    max_ratings: int = Field(10_000, ge=1, json_schema_extra=SECURITY)
    # The largest request body, refused with 413 before it is read (from Content-Length,
    # or while a chunked body streams in).
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, json_schema_extra=SECURITY)
    # Requests each worker handles at once; more get 429 + Retry-After at once. Together with
    # max_body_bytes this bounds the memory that request bodies can take.
    max_concurrency: int = Field(256, ge=1, json_schema_extra=SECURITY)
    # A request not answered within this many seconds of its body's arrival gets 504 (its
    # queued work is dropped).
    request_timeout_s: float = Field(30.0, gt=0, json_schema_extra=SECURITY)
    # A model run (one batch) that takes longer than this is taken for a hung worker: it
    # reports not alive and exits, and its process manager (BentoML, or Kubernetes through
    # the liveness probe) starts a new one. The longest real batch here takes ~3 s on CPU.
    hang_timeout_s: float = Field(60.0, gt=0)
    # Slow clients (SECURITY.md, "Slow clients"); the defaults are nginx's. A request's
    # headers must arrive within header_timeout_s of its first byte (a new connection's,
    # of its accept), else 408 and close.
    header_timeout_s: float = Field(60.0, gt=0, json_schema_extra=SECURITY)
    # A body must not pause longer than body_timeout_s between reads, and, past its first
    # body_grace_s, must average min_body_rate bytes/s or more; else 408 and close.
    body_timeout_s: float = Field(60.0, gt=0, json_schema_extra=SECURITY)
    min_body_rate: int = Field(1024, ge=0, json_schema_extra=SECURITY)
    body_grace_s: float = Field(10.0, ge=0, json_schema_extra=SECURITY)
    # Open connections per worker; more are answered 503 + Retry-After at once and closed,
    # before they can use up the process's file descriptors.
    max_connections: int = Field(1024, ge=1, json_schema_extra=SECURITY)
    # When an answer ends a connection whose request body is still arriving (a 413), the
    # server reads and discards up to linger_bytes more for up to linger_s before closing,
    # so that a client that writes its whole body before reading gets to read the answer.
    linger_s: float = Field(5.0, ge=0, json_schema_extra=SECURITY)
    linger_bytes: int = Field(64 * 1024 * 1024, ge=0, json_schema_extra=SECURITY)
    # When set, every route except open_paths needs `Authorization: Bearer <key>` (else 401).
    api_key: str = Field("", repr=False, json_schema_extra=SECURITY)
    open_paths: CommaList = Field(HEALTH_PATHS, json_schema_extra=SECURITY)
    # The API docs (/, /docs, /docs.json) and the demo page (/demo); false: all 404. The
    # pages' own files need no API key (they hold no data; what they show comes from the
    # API, which does), but /docs.json does. See service/pages.py.
    docs: bool = Field(True, json_schema_extra=SECURITY)
    # The model repository routes (POST /v2/repository/index, /v2/repository/models/{name}/
    # load and unload: service/repository.py): off, as Triton's model control is by default,
    # since they change what every client is answered by. They need the API key when one is
    # set. A load waits up to rollout_timeout_s for every worker to serve the new version.
    model_control: bool = Field(False, json_schema_extra=SECURITY)
    rollout_timeout_s: float = Field(120.0, gt=0)
    # Models that `dlserve serve` is still training and exporting beside the server (it
    # sets this itself): a worker serves the others, answers 503 for these, saying when
    # they should come, and adds each as soon as it is in the model store.
    still_training: CommaList = ()
    # When /readyz says 200: "all" configured models served (for load balancers and
    # Kubernetes), or "any" one of them (a development server whose other models are
    # still training).
    ready_when: Literal["all", "any"] = "all"
    # On SIGTERM a worker first reports not-ready for drain_delay_s while still serving (so
    # load balancers stop sending it traffic), then stops accepting and finishes in-flight
    # requests; it exits at the latest drain_timeout_s after the signal.
    drain_delay_s: float = Field(5.0, ge=0, json_schema_extra=SECURITY)
    drain_timeout_s: float = Field(25.0, gt=0, json_schema_extra=SECURITY)
    # Payload logging (service/payload_log.py, docs/payload-logging.md): empty, off; a
    # directory (gzip JSON Lines, rotated), or an http(s) URL (CloudEvents, KServe's format).
    # What it holds is what clients sent: SECURITY.md says who may read it.
    payload_log: str = Field("", json_schema_extra=SECURITY)
    # KServe's logger modes: all, request (inputs only), response (outputs only: privacy).
    payload_log_mode: Literal["all", "request", "response"] = "all"
    payload_log_sample_rate: float = Field(1.0, gt=0, le=1)
    # A body larger than this is logged as its SHA-256, size and shape instead.
    payload_log_max_bytes: int = Field(256 * 1024, ge=0)
    # Records waiting for the writer, per worker; more are dropped (and counted).
    payload_log_queue: int = Field(10_000, ge=1)
    # A file is closed, complete, and a new one started past this many bytes of records
    # (JSON, before compression) or this many seconds.
    payload_log_rotate_bytes: int = Field(64 * 1024 * 1024, ge=1)
    payload_log_rotate_s: float = Field(3600.0, gt=0)
    # The MovieLens folder inside the data directory (or an absolute path): the 100K layout
    # (u.data, u.item, u1.base, u1.test) or a newer release's ratings.csv and movies.csv.
    movielens: str = "ml-100k"
    mnist_url: str = MNIST_URL
    sst2_url: str = SST2_URL
    movielens_url: str = MOVIELENS_URL

    @field_validator(
        "models", "providers", "model_modules", "open_paths", "still_training", mode="before"
    )
    @classmethod
    def _comma_list(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw

    @field_validator("models", "providers", mode="after")
    @classmethod
    def _lower_case(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n.lower() for n in names)

    @field_validator("providers", mode="after")
    @classmethod
    def _auto(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if "auto" in names and len(names) > 1:
            raise ValueError("auto stands alone: either auto or a list such as cuda,cpu")
        if names != ("auto",):
            resolve_providers(names)  # a ValueError names the unknown ones
        return () if names == ("auto",) else names

    @field_validator("payload_log", mode="after")
    @classmethod
    def _payload_target(cls, target: str) -> str:
        if "://" in target and not target.startswith(("http://", "https://")):
            raise ValueError(f"expected a directory or an http(s):// URL, got {target!r}")
        return target

    @field_validator("data_dir", "artifacts_dir", "trt_cache_dir", mode="after")
    @classmethod
    def _expand_user(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @model_validator(mode="after")
    def _check(self) -> Self:
        known = list(registered(self.model_modules))
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise ValueError(
                f"{PREFIX}MODELS: unknown model(s) {unknown}; choose from {', '.join(known)}"
            )
        if not self.models:
            object.__setattr__(self, "models", tuple(known))
        if stray := [m for m in self.still_training if m not in self.models]:
            raise ValueError(f"{PREFIX}STILL_TRAINING: {stray} not among the models served")
        if self.require_gpu and self.providers and set(self.providers) <= {"cpu"}:
            raise ValueError(
                f"{PREFIX}REQUIRE_GPU=true but {PREFIX}PROVIDERS="
                f"{','.join(self.providers)} lists no GPU provider"
            )
        if self.drain_delay_s >= self.drain_timeout_s:
            raise ValueError(f"{PREFIX}DRAIN_DELAY_S: must be less than {PREFIX}DRAIN_TIMEOUT_S")
        return self

    @classmethod
    def env_name(cls, field: str) -> str:
        return PREFIX + field.upper()

    @classmethod
    def security_fields(cls) -> list[str]:
        """The env names of the settings SECURITY.md must document."""
        return [
            cls.env_name(name)
            for name, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("security")
        ]


_KINDS = {"int_parsing": "int", "float_parsing": "float", "bool_parsing": "true/false"}


def _describe(exc: ValidationError) -> str:
    """One line per bad value, each naming its environment variable."""
    lines = []
    for err in exc.errors(include_url=False):
        if not err["loc"]:  # a model-level check: its message names the variables itself
            lines.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        env = Settings.env_name(str(err["loc"][0]))
        if err["type"] in _KINDS:
            lines.append(f"{env}: expected {_KINDS[err['type']]}, got {err['input']!r}")
        elif err["type"] in ("greater_than_equal", "greater_than"):
            bound = err["ctx"].get("ge", err["ctx"].get("gt"))
            word = "at least" if err["type"] == "greater_than_equal" else "more than"
            lines.append(f"{env}: must be {word} {bound}, got {err['input']!r}")
        else:
            lines.append(f"{env}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; keyword overrides (CLI flags) win; None means unset."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


@cache
def get_settings() -> Settings:
    return load_settings()
