"""The execution providers by name: ONNX Runtime's names, the short ones DLSERVE_PROVIDERS
takes, and the order tried when it says "auto".

Apart from the session factory (dlserve/runtime.py) so that Settings can check
DLSERVE_PROVIDERS without importing onnxruntime or the factory, which imports Settings.
"""

from __future__ import annotations

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
SHORT_NAMES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}


def resolve_providers(names: tuple[str, ...] | list[str]) -> list[str]:
    """Short names from settings ("cuda,cpu") → ONNX Runtime provider names, in order;
    empty (DLSERVE_PROVIDERS=auto) means TensorRT, CUDA, CPU."""
    if not names:
        return list(PREFERENCE)
    unknown = [n for n in names if n not in SHORT_NAMES]
    if unknown:
        # Settings checks DLSERVE_PROVIDERS with this, and names the variable itself.
        raise ValueError(f"unknown provider(s) {unknown}; choose from auto, tensorrt, cuda, cpu")
    return [SHORT_NAMES[n] for n in names]
