"""The one ONNX Runtime session factory: TensorRT → CUDA → CPU, keeping only what really
initialises, on a real ONNX file. On this project's CPU machines onnxruntime-gpu lists the
GPU providers although they cannot run, which is exactly the case the factory exists for.
Also the provider policy (DLSERVE_PROVIDERS, DLSERVE_REQUIRE_GPU) and the provider options
built from the settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dlserve.manifest import TensorSpec
from dlserve.providers import CPU, CUDA, TENSORRT, resolve_providers
from dlserve.runtime import (
    GPURequired,
    SessionConfig,
    cpu_threads,
    create_session,
    cuda_options,
    profile,
    profile_shapes,
    session_config,
    tensorrt_options,
    warm_up_profile,
)
from dlserve.settings import SettingsError, load_settings


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x + 1, a real ONNX file."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[one],
    )
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
        str(path),
    )
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
    session = create_session(model, label="add:1", config=SessionConfig((CPU,)))
    assert session.provider == CPU and session.input_names == ["x"]
    (y,) = session.run({"x": np.array([1.0, 2.0], np.float32)})
    assert y.tolist() == [2.0, 3.0]


@pytest.mark.skipif(gpu_usable(), reason="this machine has a working GPU: nothing falls back")
def test_unusable_gpu_providers_fall_back_to_cpu_with_one_warning_naming_the_model(
    model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listed = [p for p in ("TensorrtExecutionProvider", CUDA) if p in ort.get_available_providers()]
    assert listed, "onnxruntime-gpu lists its GPU providers even without a GPU"
    with caplog.at_level(logging.WARNING, logger="dlserve.runtime"):
        session = create_session(
            model, label="add:1", config=SessionConfig(tuple(resolve_providers(())))
        )
    assert session.provider == CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("add:1: ")
    assert all(p in warnings[0] for p in listed) and warnings[0].endswith(CPU)


@pytest.mark.skipif(gpu_usable(), reason="this machine has a working GPU")
def test_a_gpu_only_list_without_a_gpu_fails_naming_the_model(model: Path) -> None:
    with pytest.raises(RuntimeError, match=r"add:1: no execution provider among .*CUDA"):
        create_session(model, label="add:1", config=SessionConfig((CUDA,)))


@pytest.mark.skipif(gpu_usable(), reason="this machine has a working GPU")
def test_require_gpu_refuses_the_cpu_fallback_naming_the_model_and_why(model: Path) -> None:
    config = SessionConfig(tuple(resolve_providers(())), require_gpu=True)
    with pytest.raises(GPURequired) as caught:
        create_session(model, label="add:1", config=config)
    message = str(caught.value)
    assert message.startswith("add:1: DLSERVE_REQUIRE_GPU=true but no GPU execution provider")
    assert f"{CUDA}: " in message and "refusing to fall back to the CPU" in message


def test_an_explicit_cpu_list_never_probes_the_gpu(
    model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dlserve.runtime"):
        session = create_session(model, label="add:1", config=SessionConfig((CPU,)))
    assert session.provider == CPU and not caplog.records


def test_providers_setting_auto_or_an_explicit_list() -> None:
    assert load_settings().providers == ()  # auto
    assert load_settings(providers="auto").providers == ()
    assert load_settings(providers="CUDA, cpu").providers == ("cuda", "cpu")
    with pytest.raises(SettingsError, match=r"^DLSERVE_PROVIDERS: unknown provider\(s\) \['tpu'\]"):
        load_settings(providers="cuda,tpu")
    with pytest.raises(SettingsError, match="DLSERVE_PROVIDERS: auto stands alone"):
        load_settings(providers="auto,cpu")
    with pytest.raises(
        SettingsError,
        match="DLSERVE_REQUIRE_GPU=true but DLSERVE_PROVIDERS=cpu lists no GPU provider",
    ):
        load_settings(providers="cpu", require_gpu=True)


def test_cpu_threads_share_the_cores_among_the_workers() -> None:
    assert cpu_threads(None, workers=1, cores=8) == 8
    assert cpu_threads(None, workers=2, cores=8) == 4
    assert cpu_threads(None, workers=3, cores=8) == 2
    assert cpu_threads(None, workers=4, cores=2) == 1  # never 0
    assert cpu_threads(3, workers=4, cores=2) == 3  # DLSERVE_ORT_THREADS wins


LSTM_INPUTS = [TensorSpec("token_ids", "int64", ["batch", "tokens"])]
RBM_INPUTS = [TensorSpec("ratings", "float32", ["users", 1682, 5])]


def test_tensorrt_profiles_cover_the_batch_and_token_limits() -> None:
    lstm = profile(LSTM_INPUTS, {"max_tokens": 256}, opt_batch=64, max_batch=256)
    assert lstm == {
        "min": {"token_ids": (1, 1)},
        "opt": {"token_ids": (64, 32)},
        "max": {"token_ids": (256, 256)},
    }
    assert profile_shapes(lstm) == {
        "trt_profile_min_shapes": "token_ids:1x1",
        "trt_profile_opt_shapes": "token_ids:64x32",
        "trt_profile_max_shapes": "token_ids:256x256",
    }
    assert profile_shapes(profile(RBM_INPUTS, {}, opt_batch=64, max_batch=256)) == {
        "trt_profile_min_shapes": "ratings:1x1682x5",
        "trt_profile_opt_shapes": "ratings:64x1682x5",
        "trt_profile_max_shapes": "ratings:256x1682x5",
    }
    two = [TensorSpec("a", "float32", ["batch", 3]), TensorSpec("b", "float32", ["batch"])]
    opt = profile_shapes(profile(two, {}, opt_batch=8, max_batch=4))["trt_profile_opt_shapes"]
    assert opt == "a:4x3,b:4"
    with pytest.raises(ValueError, match="dynamic axis 'tokens' has no bound"):
        profile(LSTM_INPUTS, {}, opt_batch=64, max_batch=256)


def test_the_warm_up_runs_every_profile_shape(model: Path) -> None:
    """On TensorRT this builds the engine before the first request; here it runs on the
    CPU, which shows that the shapes and dtypes are valid inputs."""
    session = create_session(model, label="add:1", config=SessionConfig((CPU,)))
    seen = []
    real_run = session.run

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        seen.append(feed["x"].shape)
        return real_run(feed)

    session.run = run  # type: ignore[method-assign]
    shapes = profile([TensorSpec("x", "float32", ["n"])], {}, opt_batch=8, max_batch=32)
    warm_up_profile(session, shapes, {"x": "float32"})
    assert seen == [(1,), (8,), (32,)]


def test_provider_options_come_from_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        trt_fp16=True,
        trt_cache_dir=str(tmp_path),
        cuda_device_id=1,
        cudnn_conv_algo_search="EXHAUSTIVE",
        max_batch_size=32,
        max_items=128,
        workers=2,
        ort_threads=None,
    )
    shapes = profile(LSTM_INPUTS, {"max_tokens": 100}, opt_batch=32, max_batch=128)
    profiles = profile_shapes(shapes)
    trt = tensorrt_options(settings, tmp_path, profiles)
    assert trt == {
        "device_id": 1,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path),
        "trt_profile_min_shapes": "token_ids:1x1",
        "trt_profile_opt_shapes": "token_ids:32x32",
        "trt_profile_max_shapes": "token_ids:128x100",
    }
    assert cuda_options(settings) == {
        "device_id": 1,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }
    config = session_config(
        settings, LSTM_INPUTS, {"max_tokens": 100}, default_cache_dir=tmp_path / "beside-the-model"
    )
    assert config.providers == (TENSORRT, CUDA, CPU) and not config.require_gpu
    assert config.profile == shapes
    assert config.options[TENSORRT] == trt and config.options[CUDA] == cuda_options(settings)
    assert config.threads == cpu_threads(None, 2, len(os.sched_getaffinity(0)))
    # Without DLSERVE_TRT_CACHE_DIR, the caches live beside the model.
    default = session_config(
        load_settings(),
        LSTM_INPUTS,
        {"max_tokens": 100},
        default_cache_dir=tmp_path / "beside-the-model",
    )
    assert default.options[TENSORRT]["trt_engine_cache_path"] == str(tmp_path / "beside-the-model")
    assert default.options[TENSORRT]["trt_fp16_enable"] is False
