"""The one ONNX Runtime session factory: TensorRT, then CUDA, then CPU, whichever works.

onnxruntime-gpu lists the GPU providers as available even on a machine with no GPU or
no CUDA libraries; asking for them there prints errors and silently runs on the CPU.
So each provider is tried on its own and kept only if the session really uses it; a
fallback is logged once at WARNING and the provider in use is reported to the caller
(it shows in GET /models and in the model-info metric).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
SHORT_NAMES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
ORT_WARNING, ORT_FATAL = 2, 4


@dataclass
class Session:
    """An InferenceSession plus what callers need to know about it."""

    session: ort.InferenceSession
    provider: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


def resolve_providers(names: tuple[str, ...] | list[str]) -> list[str]:
    """Short names from settings ("cuda,cpu") → ONNX Runtime provider names, in order."""
    if not names:
        return list(PREFERENCE)
    unknown = [n for n in names if n not in SHORT_NAMES]
    if unknown:
        raise ValueError(
            f"DLSERVE_PROVIDERS: unknown provider(s) {unknown}; choose from tensorrt, cuda, cpu")
    return [SHORT_NAMES[n] for n in names]


def _provider_options(provider: str, cache_dir: Path | None) -> dict[str, Any]:
    if provider == TENSORRT and cache_dir is not None:
        # Building a TensorRT engine takes seconds to minutes; cache it beside the model.
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}
    return {}


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return opts


def create_session(onnx_path: Path, *, label: str = "", providers: tuple[str, ...] | list[str] = (),
                   threads: int = 1, cache_dir: Path | None = None) -> Session:
    """Open `onnx_path` on the first provider in `providers` that really initialises;
    `label` (the model's tag) names it in the fallback warning."""
    wanted = resolve_providers(providers)
    available = set(ort.get_available_providers())
    failed: list[str] = []
    for provider in wanted:
        if provider not in available:
            continue
        chain: list[Any] = [(provider, _provider_options(provider, cache_dir))]
        captured = io.StringIO()
        if provider != CPU:
            chain.append(CPU)
            # Quiet the library while probing: its C++ logger writes errors to stderr and its
            # Python fallback print()s to stdout (which would corrupt `eval --json`).
            ort.set_default_logger_severity(ORT_FATAL)
        try:
            with contextlib.redirect_stdout(captured):
                sess = ort.InferenceSession(str(onnx_path), _session_options(threads),
                                            providers=chain)
        except Exception as exc:  # noqa: BLE001 - any provider failure means "try the next"
            if provider == CPU:
                raise
            log.debug("%s failed to initialise: %s", provider, exc)
            failed.append(provider)
            continue
        finally:
            ort.set_default_logger_severity(ORT_WARNING)
            if captured.getvalue().strip():
                log.debug("onnxruntime said: %s", captured.getvalue().strip())
        if sess.get_providers()[0] != provider:
            failed.append(provider)
            continue
        if failed:
            log.warning("%s: %s not usable on this machine; running on %s",
                        label or onnx_path, ", ".join(failed), provider)
        return Session(
            session=sess,
            provider=provider,
            input_names=[i.name for i in sess.get_inputs()],
            output_names=[o.name for o in sess.get_outputs()],
        )
    raise RuntimeError(
        f"{label or onnx_path}: no execution provider among {wanted} works here "
        f"(available: {sorted(available)}; failed: {failed})"
    )
