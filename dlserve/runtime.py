"""The one ONNX Runtime session factory: TensorRT, then CUDA, then CPU, whichever works.

onnxruntime-gpu lists the GPU providers as available even on a machine with no GPU or
no CUDA libraries; asking for them there prints errors and silently runs on the CPU.
So each provider is tried on its own and kept only if the session really uses it; a
fallback is logged once at WARNING and the provider in use is reported to the caller
(it shows in GET /models and in the model-info metric). Under DLSERVE_REQUIRE_GPU a
fallback to the CPU is an error instead, naming the model and why each GPU provider failed.

The providers' options are pure functions of the settings and the model's manifest
(`session_config`), so that what a GPU node would get is tested on a CPU machine.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from dlserve.manifest import TensorSpec
from dlserve.providers import CPU, CUDA, TENSORRT, resolve_providers

if TYPE_CHECKING:
    from dlserve.settings import Settings

log = logging.getLogger(__name__)

ORT_WARNING, ORT_FATAL = 2, 4
# The token count TensorRT tunes the LSTM's engine for (its profile's "opt"): SST-2 dev
# sentences have 19.6 tokens on average, 95 % at most 35 and the longest 49.
TYPICAL_LENGTH = 32
Profile = dict[str, dict[str, tuple[int, ...]]]  # "min"/"opt"/"max" → input name → shape


@dataclass
class Session:
    """An InferenceSession plus what callers need to know about it."""

    session: ort.InferenceSession
    provider: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self.session.run(self.output_names, feed)
        return outputs


class GPURequired(RuntimeError):
    """DLSERVE_REQUIRE_GPU is set and no GPU provider works for a model."""


@dataclass(frozen=True)
class SessionConfig:
    """How to open a session: the providers to try in order, each one's options, and the
    CPU threads. Built from Settings and the model's manifest by `session_config`."""

    providers: tuple[str, ...]  # ONNX Runtime names, in order of preference
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # by provider
    threads: int = 1  # intra-op threads of the CPU provider
    require_gpu: bool = False
    profile: Profile = field(default_factory=dict)  # TensorRT's shapes, warmed up at load
    cpu_mem_arena: bool = False  # ONNX Runtime's CPU arena (see _session_options)
    mem_pattern: bool = True  # ONNX Runtime's memory-pattern planning, per input shape


def cpu_threads(explicit: int | None, workers: int, cores: int) -> int:
    """Intra-op threads per session: DLSERVE_ORT_THREADS when set, else the cores shared
    out among the worker processes, so that workers × threads does not oversubscribe the
    cores (each worker runs its own sessions, one batch at a time)."""
    return explicit if explicit is not None else max(1, cores // workers)


def profile(
    inputs: list[TensorSpec], preprocessing: dict[str, Any], *, opt_batch: int, max_batch: int
) -> Profile:
    """TensorRT's optimisation profile: each input's min, opt and max shape. The first
    axis is the batch (1 → `max_batch`, tuned for `opt_batch`); any other dynamic axis X
    is bounded by the manifest's `preprocessing["max_X"]` (the LSTM's `max_tokens`), tuned
    for TYPICAL_LENGTH. With it, TensorRT builds one engine for every shape the service
    can send, instead of a new engine whenever a batch is larger than any seen before."""
    shapes: Profile = {"min": {}, "opt": {}, "max": {}}
    for spec in inputs:
        dims: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for index, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                low = opt = high = dim
            elif index == 0:
                low, opt, high = 1, min(opt_batch, max_batch), max_batch
            else:
                bound = preprocessing.get(f"max_{dim}")
                if not isinstance(bound, int):
                    raise ValueError(
                        f"input {spec.name}: dynamic axis {dim!r} has no bound "
                        f"(the manifest's preprocessing has no max_{dim})"
                    )
                low, opt, high = 1, min(TYPICAL_LENGTH, bound), bound
            for key, value in (("min", low), ("opt", opt), ("max", high)):
                dims[key].append(value)
        for key, values in dims.items():
            shapes[key][spec.name] = tuple(values)
    return shapes


def profile_shapes(shapes: Profile) -> dict[str, str]:
    """The profile in the TensorRT provider's option syntax ("token_ids:1x1,...")."""
    return {
        f"trt_profile_{key}_shapes": ",".join(
            f"{name}:{'x'.join(map(str, shape))}" for name, shape in by_input.items()
        )
        for key, by_input in shapes.items()
    }


def warm_up_profile(session: Session, shapes: Profile, dtypes: dict[str, str]) -> None:
    """Run the session once at each of the profile's shapes (zeros), so that TensorRT has
    built (or loaded from its cache) what those shapes need before the first request."""
    for by_input in shapes.values():
        session.run({name: np.zeros(shape, dtype=dtypes[name]) for name, shape in by_input.items()})


def tensorrt_options(
    settings: Settings, cache_dir: Path, profiles: dict[str, str]
) -> dict[str, Any]:
    """The TensorRT provider's options: FP16 kernels when asked, engine and timing caches
    in a persistent folder (building an engine takes seconds to minutes per model; a cached
    one loads in well under a second), and the optimisation profiles."""
    return {
        "device_id": settings.cuda_device_id,
        "trt_fp16_enable": settings.trt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        **profiles,
    }


def cuda_options(settings: Settings) -> dict[str, Any]:
    """The CUDA provider's options. The arena grows by what is requested rather than by
    powers of two: the models are small and a server holds three of them per worker.
    cuDNN's algorithm search defaults to HEURISTIC: EXHAUSTIVE benchmarks every convolution
    algorithm at each new input shape, and adaptive batching makes every batch size a new
    shape, so requests would pay for searches long after start-up."""
    return {
        "device_id": settings.cuda_device_id,
        "arena_extend_strategy": settings.cuda_arena_extend_strategy,
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
    }


def session_config(
    settings: Settings,
    inputs: list[TensorSpec],
    preprocessing: dict[str, Any],
    *,
    default_cache_dir: Path,
) -> SessionConfig:
    """Everything `create_session` needs for one model, from the settings and its manifest."""
    max_batch = max(settings.max_batch_size, settings.max_items)
    cache_dir = settings.trt_cache_dir or default_cache_dir
    shapes = profile(inputs, preprocessing, opt_batch=settings.max_batch_size, max_batch=max_batch)
    return SessionConfig(
        providers=tuple(resolve_providers(settings.providers)),
        profile=shapes,
        options={
            TENSORRT: tensorrt_options(settings, cache_dir, profile_shapes(shapes)),
            CUDA: cuda_options(settings),
        },
        threads=cpu_threads(settings.ort_threads, settings.workers, len(os.sched_getaffinity(0))),
        require_gpu=settings.require_gpu,
        cpu_mem_arena=settings.ort_cpu_mem_arena,
        mem_pattern=settings.ort_mem_pattern,
    )


def _session_options(config: SessionConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One batch at a time per session, and the graphs are chains: a parallel executor
    # (inter-op threads) would have nothing to run side by side.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = config.threads
    opts.inter_op_num_threads = 1
    # The CPU arena keeps every block it ever grew to, for the life of the session: one run
    # of 256 long texts left each worker holding ~1 GiB after the burst that caused it.
    # Without it, tensors come from malloc and go back when the run ends (BENCHMARKS.md,
    # "Memory": what each option holds after a burst, and what it costs in speed).
    opts.enable_cpu_mem_arena = config.cpu_mem_arena
    opts.enable_mem_pattern = config.mem_pattern
    return opts


def _try(onnx_path: Path, provider: str, config: SessionConfig) -> ort.InferenceSession | str:
    """A session on `provider`, or why it cannot have one."""
    chain: list[Any] = [(provider, config.options.get(provider, {}))]
    captured = io.StringIO()
    if provider != CPU:
        chain.append(CPU)
        # Quiet the library while probing: its C++ logger writes errors to stderr and its
        # Python fallback print()s to stdout (which would corrupt `eval --json`).
        ort.set_default_logger_severity(ORT_FATAL)
    try:
        with contextlib.redirect_stdout(captured):
            sess = ort.InferenceSession(str(onnx_path), _session_options(config), providers=chain)
    except Exception as exc:  # noqa: BLE001 - any provider failure means "try the next"
        if provider == CPU:
            raise
        return f"failed to initialise ({str(exc).strip().splitlines()[0][:200]})"
    finally:
        ort.set_default_logger_severity(ORT_WARNING)
        if captured.getvalue().strip():
            log.debug("onnxruntime said: %s", captured.getvalue().strip())
    if sess.get_providers()[0] != provider:
        # onnxruntime-gpu on a machine without a GPU or its CUDA libraries: the session
        # "succeeds" on the CPU alone.
        return "listed by onnxruntime but fell back to the CPU (no usable GPU or CUDA libraries)"
    return sess


def create_session(
    onnx_path: Path, *, label: str = "", config: SessionConfig | None = None
) -> Session:
    """Open `onnx_path` on the first provider in `config.providers` that really
    initialises; `label` (the model's tag) names it in the fallback warning and errors.
    With `config.require_gpu`, running on the CPU is an error (GPURequired) instead."""
    config = config or SessionConfig(providers=(CPU,))
    name = label or str(onnx_path)
    available = set(ort.get_available_providers())
    why: dict[str, str] = {}
    for provider in config.providers:
        if provider == CPU and config.require_gpu:
            break
        if provider not in available:
            why[provider] = "not in this onnxruntime build (the GPU providers need onnxruntime-gpu)"
            continue
        sess = _try(onnx_path, provider, config)
        if isinstance(sess, str):
            why[provider] = sess
            continue
        if why:
            log.warning(
                "%s: %s not usable on this machine; running on %s", name, ", ".join(why), provider
            )
            log.debug("%s: why: %s", name, why)
        return Session(
            session=sess,
            provider=provider,
            input_names=[i.name for i in sess.get_inputs()],
            output_names=[o.name for o in sess.get_outputs()],
        )
    reasons = "; ".join(f"{p}: {w}" for p, w in why.items()) or "no GPU provider listed"
    if config.require_gpu:
        raise GPURequired(
            f"{name}: DLSERVE_REQUIRE_GPU=true but no GPU execution provider works for it "
            f"({reasons}); refusing to fall back to the CPU"
        )
    raise RuntimeError(
        f"{name}: no execution provider among {list(config.providers)} works here "
        f"(available: {sorted(available)}; {reasons})"
    )
