"""The one ONNX Runtime session factory: TensorRT → CUDA → CPU, keeping only what really
initialises, on a real ONNX file. On this project's CPU machines onnxruntime-gpu lists the
GPU providers although they cannot run, which is exactly the case the factory exists for."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dlserve.runtime import CPU, CUDA, create_session, resolve_providers


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x + 1, a real ONNX file."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], initializer=[one])
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=9), str(path))
    return path


def gpu_usable() -> bool:
    return CUDA in ort.get_available_providers() and _cuda_really_runs()


def _cuda_really_runs() -> bool:
    try:
        import ctypes
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def test_short_names_map_to_providers_in_order() -> None:
    assert resolve_providers(()) == ["TensorrtExecutionProvider", CUDA, CPU]
    assert resolve_providers(("cuda", "cpu")) == [CUDA, CPU]
    with pytest.raises(ValueError, match=r"unknown provider\(s\) \['tpu'\]"):
        resolve_providers(("tpu",))


def test_the_session_runs_and_reports_its_provider(model: Path) -> None:
    session = create_session(model, label="add:1", providers=("cpu",))
    assert session.provider == CPU and session.input_names == ["x"]
    (y,) = session.run({"x": np.array([1.0, 2.0], np.float32)})
    assert y.tolist() == [2.0, 3.0]


@pytest.mark.skipif(gpu_usable(), reason="this machine has a working GPU: nothing falls back")
def test_unusable_gpu_providers_fall_back_to_cpu_with_one_warning_naming_the_model(
        model: Path, caplog: pytest.LogCaptureFixture) -> None:
    listed = [p for p in ("TensorrtExecutionProvider", CUDA) if p in ort.get_available_providers()]
    assert listed, "onnxruntime-gpu lists its GPU providers even without a GPU"
    with caplog.at_level(logging.WARNING, logger="dlserve.runtime"):
        session = create_session(model, label="add:1")
    assert session.provider == CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("add:1: ")
    assert all(p in warnings[0] for p in listed) and warnings[0].endswith(CPU)


@pytest.mark.skipif(gpu_usable(), reason="this machine has a working GPU")
def test_a_gpu_only_list_without_a_gpu_fails_naming_the_model(model: Path) -> None:
    with pytest.raises(RuntimeError, match=r"add:1: no execution provider among .*CUDA"):
        create_session(model, label="add:1", providers=("cuda",))
