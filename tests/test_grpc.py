"""The Open Inference Protocol over gRPC against one real server (2 workers sharing the
port), with the real clients of Triton (`tritonclient.grpc`) and KServe (`kserve`'s
InferenceGRPCClient), and the standard grpc.health.v1 service: metadata and infer for all
three models with the JSON routes' answers, raw and typed tensors, each client mistake's
status code and message, the API key, cancelled and timed-out calls, and the drain.

tritonclient.grpc and kserve define the same protobuf names (package `inference`), which
protobuf refuses in one process, and other test files import kserve: Triton's client runs
in a child process (`TRITON_SCRIPT`), once for the module, and its answers are checked here.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kserve import InferenceGRPCClient, InferInput, InferRequest

from bench.http import Server, free_port
from cli.serve import PortInUseError, check_ports_free
from dlserve import registry
from dlserve.errors import InputError
from dlserve.protocol import Decoded
from dlserve.protocol import InferRequest as RestInferRequest
from dlserve.settings import get_settings, load_settings
from readers.mnist import load_mnist
from readers.sst2 import load_sst2
from service import grpc_inference_pb2 as pb
from service import grpc_server, grpc_tensors
from tests.conftest import ROOT, start_server
from tests.test_service_digits import metric_total

KEY = "grpc-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
MAX_BODY = 2_000_000
N = 16
USER = [(50, 5.0), (172, 4.5), (181, 4.0), (1, 2.0)]
ASKED = [2, 3, 98, 100]
# About 200 words each: 256 of them are several model runs of seconds in all.
LONG_TEXT = " ".join(["the plot wanders for a while before the ending lands"] * 20)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def grpc_served(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, str]]:
    """One server for the file: 2 workers on one gRPC port, an API key, a small body limit,
    model control on, a short drain delay (the last test drains it). Yields it and the
    gRPC address, once gRPC answers SERVING."""
    port = free_port()
    with start_server(
        tmp_path_factory.mktemp("grpc"),
        DLSERVE_WORKERS="2",
        DLSERVE_GRPC_PORT=str(port),
        DLSERVE_API_KEY=KEY,
        DLSERVE_MAX_BODY_BYTES=str(MAX_BODY),
        DLSERVE_MODEL_CONTROL="true",
        DLSERVE_DRAIN_DELAY_S="2",
    ) as server:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while health(address) != SERVING:
            assert time.monotonic() < deadline, "gRPC never answered SERVING"
            time.sleep(0.1)
        yield server, address


@pytest.fixture(scope="module")
def address(grpc_served: tuple[Server, str]) -> str:
    return grpc_served[1]


@pytest.fixture(scope="module")
def http(grpc_served: tuple[Server, str]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=grpc_served[0].url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def images(data_dir: Path) -> np.ndarray:
    return load_mnist(data_dir, "test").images[:N]


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> list[str]:
    return load_sst2(data_dir, "dev").texts[:N] + ["Ça déçoit, vraiment. 😞"]


def health(address: str, service: str = "") -> int | None:
    """The health service's status, or None when nothing answers on the port."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return None
            raise
    status: int = answer.status
    return status


def infer_method(channel: grpc.Channel) -> Any:
    """ModelInfer, with dlserve's own copy of the messages (service/grpc_inference_pb2)."""
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


# Triton's client, in a child process: every call the tests check, answers as JSON.
TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

address, key, folder = sys.argv[1:4]
H = {"authorization": f"Bearer {key}"}
c = g.InferenceServerClient(address)
out = {}

def tensor(name, array, datatype):
    t = g.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t

def failure(call):
    try:
        call()
    except InferenceServerException as exc:
        return [exc.status(), exc.message()]
    return None

out["live"] = c.is_server_live(headers=H)
out["ready"] = c.is_server_ready(headers=H)
out["server"] = c.get_server_metadata(headers=H, as_json=True)
out["models"] = {m: c.get_model_metadata(m, headers=H, as_json=True)
                 for m in ("digits", "sentiment", "recommender")}
out["model_ready"] = c.is_model_ready("digits", headers=H)
version = out["models"]["digits"]["versions"][0]
out["version_ready"] = c.is_model_ready("digits", version, headers=H)
out["other_version_ready"] = failure(lambda: c.is_model_ready("digits", "nope", headers=H))

images = np.load(f"{folder}/images.npy")
result = c.infer("digits", [tensor("pixels", images, "UINT8")], headers=H, request_id="r-1")
out["digits"] = {"id": result.get_response().id,
                 "digit": result.as_numpy("digit").tolist(),
                 "probabilities": result.as_numpy("probabilities").tolist()}
result = c.infer("digits", [tensor("pixels", images.astype(np.float32)[:, None], "FP32")],
                 headers=H, outputs=[g.InferRequestedOutput("digit")])
out["digits_fp32"] = {"digit": result.as_numpy("digit").tolist(),
                      "outputs": [o.name for o in result.get_response().outputs]}
texts = json.loads(open(f"{folder}/texts.json").read())
text = np.array([t.encode() for t in texts], dtype=object)
result = c.infer("sentiment", [tensor("text", text, "BYTES")], headers=H)
out["sentiment"] = {"label": [x.decode() for x in result.as_numpy("label")],
                    "positive_probability": result.as_numpy("positive_probability").tolist()}
user = json.loads(open(f"{folder}/user.json").read())
def rated(ids, stars):
    return [tensor("rated_movie_ids", np.array(ids, np.int64), "INT64"),
            tensor("ratings", np.array(stars, np.float32), "FP32")]
asked = tensor("movie_ids", np.array(user["asked"], np.int64), "INT64")
ids, stars = zip(*user["ratings"])
result = c.infer("recommender", rated(ids, stars) + [asked], headers=H, parameters={"k": 7})
out["recommender"] = {
    "ids": result.as_numpy("recommended_movie_ids").tolist(),
    "titles": [t.decode() for t in result.as_numpy("recommended_titles")],
    "predicted": result.as_numpy("predicted_ratings").tolist(),
}

def digits(array, datatype="UINT8", headers=H, **kwargs):
    return lambda: c.infer("digits", [tensor("pixels", array, datatype)], headers=headers, **kwargs)
zeros = np.zeros((1, 28, 28), np.uint8)
blank = [tensor("pixels", zeros, "UINT8")]
out["errors"] = {
    "unknown model": failure(lambda: c.infer("nope", blank, headers=H)),
    "wrong datatype": failure(digits(zeros.astype(np.int64), "INT64")),
    "wrong shape": failure(digits(np.zeros((1, 27, 28), np.uint8))),
    "unknown output": failure(digits(zeros, outputs=[g.InferRequestedOutput("colour")])),
    "over the limit": failure(digits(np.zeros((3000, 28, 28), np.uint8))),
    "no key": failure(digits(zeros, headers=None)),
    "wrong key": failure(lambda: c.get_model_metadata("digits", headers={"authorization": "x"})),
    "unknown model metadata": failure(lambda: c.get_model_metadata("nope", headers=H)),
}
# Triton's model repository extension (DLSERVE_MODEL_CONTROL=true): unload, then load again.
out["index"] = c.get_model_repository_index(headers=H, as_json=True)
c.unload_model("recommender", headers=H)
out["unloaded_ready"] = c.is_model_ready("recommender", headers=H)
out["unloaded_infer"] = failure(lambda: c.infer("recommender", rated([1], [4.0]), headers=H))
c.load_model("recommender", headers=H)
out["reloaded_ready"] = c.is_model_ready("recommender", headers=H)
out["load_refused"] = failure(lambda: c.load_model("recommender", headers=H, config="{}"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton(
    address: str, http: httpx.Client, images: np.ndarray, texts: list[str], tmp_path_factory
) -> dict[str, Any]:
    """What tritonclient.grpc was answered (TRITON_SCRIPT, in a child process)."""
    folder = tmp_path_factory.mktemp("triton")
    np.save(folder / "images.npy", images)
    (folder / "texts.json").write_text(json.dumps(texts))
    (folder / "user.json").write_text(json.dumps({"ratings": USER, "asked": ASKED}))
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, address, KEY, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers: dict[str, Any] = json.loads(done.stdout)
    return answers


def test_the_workers_share_one_grpc_port_and_a_second_server_cannot(grpc_served) -> None:
    server, address = grpc_served
    port = int(address.rsplit(":", 1)[1])

    def listening() -> set[int]:
        # (psutil >= 6 names it net_connections, 5.9 connections)
        return {
            p.pid
            for p in server.processes()
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in (getattr(p, "net_connections", None) or p.connections)(kind="tcp")
            )
        }

    deadline = time.monotonic() + 30  # each worker listens once its own models are loaded
    while len(listening()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(listening()) == 2, f"processes listening on the gRPC port: {listening()}"
    # What `dlserve serve` checks first: a bind without SO_REUSEPORT fails, naming the holder.
    second = load_settings(port=free_port(), grpc_port=port)
    with pytest.raises(PortInUseError, match=rf"DLSERVE_GRPC_PORT\) {port} is already in use \(by"):
        check_ports_free(second)
    check_ports_free(load_settings(port=free_port(), grpc_port=0))  # off: not checked


def test_metadata_and_health_answer_tritons_client(triton, http) -> None:
    assert triton["live"] and triton["ready"] and triton["model_ready"]
    assert triton["version_ready"]
    assert triton["other_version_ready"][0] == "StatusCode.NOT_FOUND"
    assert "no version 'nope'" in triton["other_version_ready"][1]
    assert triton["server"]["name"] == "dlserve"
    assert "model_repository" in triton["server"]["extensions"]
    for name, described in triton["models"].items():
        rest = http.get(f"/v2/models/{name}").json()
        assert described["name"] == rest["name"] and described["versions"] == rest["versions"]
        assert described["platform"] == rest["platform"]
        for side in ("inputs", "outputs"):
            assert [{**t, "shape": [int(s) for s in t["shape"]]} for t in described[side]] == rest[
                side
            ]


def test_tritons_client_gets_the_json_routes_answers(triton, http, images, texts) -> None:
    digits = http.post("/digits/predict", json={"images": images.tolist()}).json()
    assert triton["digits"]["id"] == "r-1"
    assert triton["digits"]["digit"] == [p["digit"] for p in digits["predictions"]]
    assert triton["digits_fp32"] == {
        "digit": triton["digits"]["digit"],
        "outputs": ["digit"],
    }
    np.testing.assert_allclose(
        triton["digits"]["probabilities"],
        [p["probabilities"] for p in digits["predictions"]],
        atol=1e-6,
    )
    sentiment = http.post("/sentiment/predict", json={"texts": texts}).json()["predictions"]
    assert triton["sentiment"]["label"] == [p["label"] for p in sentiment]
    np.testing.assert_allclose(
        triton["sentiment"]["positive_probability"],
        [p["positive_probability"] for p in sentiment],
        atol=1e-6,
    )
    ratings = [{"movie_id": m, "rating": r} for m, r in USER]
    recs = http.post("/recommender/recommend", json={"ratings": ratings, "k": 7}).json()
    assert triton["recommender"]["ids"] == [m["movie_id"] for m in recs["recommendations"]]
    assert triton["recommender"]["titles"] == [m["title"] for m in recs["recommendations"]]
    preds = http.post("/recommender/predict", json={"ratings": ratings, "movie_ids": ASKED})
    np.testing.assert_allclose(
        triton["recommender"]["predicted"],
        [p["predicted_rating"] for p in preds.json()["predicted_ratings"]],
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("unknown model", "NOT_FOUND", "model 'nope' is not served here"),
        ("wrong datatype", "INVALID_ARGUMENT", r"datatype INT64 is not accepted; send UINT8"),
        ("wrong shape", "INVALID_ARGUMENT", r"pixels: expected shape \[N, 28, 28\]"),
        ("unknown output", "INVALID_ARGUMENT", r"outputs\[0\] \(colour\): no output"),
        ("over the limit", "RESOURCE_EXHAUSTED", r"larger than max \(2352\d+ vs. 2000000\)"),
        ("no key", "UNAUTHENTICATED", "missing or wrong API key"),
        ("wrong key", "UNAUTHENTICATED", "`authorization: Bearer <key>`"),
        ("unknown model metadata", "NOT_FOUND", "model 'nope' is not served here"),
    ],
)
def test_client_mistakes_get_their_status_code_and_a_message(triton, case, code, message) -> None:
    status, text = triton["errors"][case]
    assert status == f"StatusCode.{code}", text
    assert re.search(message, text), text


def test_tritons_repository_calls_unload_and_load_a_model(triton) -> None:
    index = triton["index"]["models"]
    assert {m["name"] for m in index} == {"digits", "sentiment", "recommender"}
    assert all(m["state"] == "READY" for m in index if m["name"] == "digits")
    assert triton["unloaded_ready"] is False
    status, text = triton["unloaded_infer"]
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "Request for unknown model: 'recommender' has no available versions" in text
    assert triton["reloaded_ready"] is True
    status, text = triton["load_refused"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "unsupported load parameter" in text


def test_kserves_client_gets_the_json_routes_answers_with_typed_and_raw_tensors(
    address, http, images, texts
) -> None:
    digits = http.post("/digits/predict", json={"images": images.tolist()}).json()
    sentiment = http.post("/sentiment/predict", json={"texts": texts}).json()["predictions"]

    async def ask() -> dict[str, Any]:
        client = InferenceGRPCClient(address, timeout=30)
        answers: dict[str, Any] = {
            "ready": await client.is_server_ready(headers=AUTH),
            "model_ready": await client.is_model_ready("digits", headers=AUTH),
        }
        for typed in (True, False):
            pixels = InferInput("pixels", list(images.shape), "FP32")
            if typed:  # a list: InferTensorContents.fp32_contents
                pixels = InferInput("pixels", list(images.shape), "FP32", images.ravel().tolist())
            else:  # numpy: raw_input_contents
                pixels.set_data_from_numpy(images.astype(np.float32), binary_data=True)
            response = await client.infer(InferRequest("digits", [pixels]), headers=AUTH)
            outputs = {o.name: o.as_numpy() for o in response.outputs}
            answers[f"digits typed={typed}"] = outputs["digit"].tolist()
            answers[f"probabilities typed={typed}"] = outputs["probabilities"]
        text = InferInput("text", [len(texts)], "BYTES", texts)  # bytes_contents
        response = await client.infer(InferRequest("sentiment", [text]), headers=AUTH)
        answers["label"] = [
            x.decode() if isinstance(x, bytes) else x
            for x in next(o for o in response.outputs if o.name == "label").as_numpy()
        ]
        await client.close()
        return answers

    answers = asyncio.run(ask())
    assert answers["ready"] and answers["model_ready"]
    expected = [p["digit"] for p in digits["predictions"]]
    assert answers["digits typed=True"] == answers["digits typed=False"] == expected
    for typed in (True, False):
        np.testing.assert_allclose(
            answers[f"probabilities typed={typed}"],
            [p["probabilities"] for p in digits["predictions"]],
            atol=1e-6,
        )
    assert answers["label"] == [p["label"] for p in sentiment]


def raw_request(model: str, **inputs: np.ndarray) -> Any:
    """A ModelInferRequest with each input's raw contents."""
    request = pb.ModelInferRequest(model_name=model)
    datatypes = {np.dtype(np.uint8): "UINT8", np.dtype(object): "BYTES"}
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatypes[array.dtype], shape=array.shape)
        if array.dtype == object:
            raw = b"".join(len(x).to_bytes(4, "little") + x for x in array.ravel())
        else:
            raw = array.tobytes()
        request.raw_input_contents.append(raw)
    return request


def test_malformed_and_mixed_requests_are_invalid_arguments(address) -> None:
    with grpc.insecure_channel(address) as channel:
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            garbage(b"\xff\xff\xff", metadata=AUTH, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid dlserve.inference.ModelInferRequest" in caught.value.details()
        request = raw_request("digits", pixels=np.zeros((1, 28, 28), np.uint8))
        request.inputs[0].contents.uint_contents.extend([0] * 784)  # and typed contents too
        with pytest.raises(grpc.RpcError) as caught:
            infer_method(channel)(request, metadata=AUTH, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "contents given as well as raw_input_contents" in caught.value.details()


def test_cancelled_and_timed_out_calls_leave_no_work_queued(address, http) -> None:
    """A call of 256 long texts is several model runs (one chunk queued at a time): a call
    past its deadline, and one cancelled, while their first run runs, have the rest
    withdrawn. One after the other, each on an idle model: a call that meets a busy one
    could be refused at once instead (its deadline cannot be met)."""
    texts = np.array([LONG_TEXT.encode()] * 256, dtype=object)
    request = raw_request("sentiment", text=texts)

    def predicted() -> float:
        return metric_total(http, "dlserve_items_predicted_total", model="sentiment")

    def abandoned() -> float:
        return metric_total(http, "dlserve_requests_abandoned_total", model="sentiment")

    def settled(gone: float) -> float:
        """Items predicted once `gone` calls are counted abandoned and the model is idle."""
        deadline = time.monotonic() + 30
        last = None
        while abandoned() < gone or predicted() != last:
            assert time.monotonic() < deadline, "the calls were not counted, or work went on"
            last = predicted()
            time.sleep(0.5)
        return last

    before = predicted()
    with grpc.insecure_channel(address) as channel:
        gone = abandoned()
        with pytest.raises(grpc.RpcError) as caught:
            infer_method(channel)(request, metadata=AUTH, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        settled(gone + 1)
        call = infer_method(channel).future(request, metadata=AUTH, timeout=30)
        time.sleep(0.5)
        assert call.cancel()
        after = settled(gone + 2)
    # Each ran only the runs started before it went: together, less than one whole call.
    assert after - before < len(texts)


def test_health_follows_the_workers_readiness(address) -> None:
    assert health(address) == SERVING
    assert health(address, "inference.GRPCInferenceService") == SERVING
    assert health(address, "digits") == SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health(address, "nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_not_serving_while_models_load_or_the_worker_drains() -> None:
    """Health's own answers for a worker's states (a real server starts listening only
    once its models are loaded, so it is never seen loading)."""
    state = SimpleNamespace(specs={"digits": None}, serving={}, draining=False)

    async def statuses(ready: bool) -> list[int | None]:
        async def is_ready() -> bool:
            return ready

        checker = grpc_server.Health(state, is_ready)  # type: ignore[arg-type]
        return [await checker.status(s) for s in ("", "digits", "nope")]

    assert asyncio.run(statuses(False)) == [NOT_SERVING, NOT_SERVING, None]
    state.serving = {"digits": object()}
    assert asyncio.run(statuses(True)) == [SERVING, SERVING, None]
    state.draining = True
    assert asyncio.run(statuses(False)) == [NOT_SERVING, NOT_SERVING, None]


def test_typed_contents_are_checked_like_json_data() -> None:
    """service/grpc_tensors.py, in this process: each datatype's field, the same checks of
    counts and ranges as the REST route's JSON data, FP16 raw only."""
    tensors = registry.serving(get_settings())["digits"].tensors
    request = pb.ModelInferRequest(model_name="digits")
    given = request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 28, 28])
    given.contents.fp32_contents.extend([0.0] * 784)
    with pytest.raises(InputError, match="UINT8 data goes in contents.uint_contents, not fp32"):
        grpc_tensors.decode(request, tensors, max_body=MAX_BODY)
    given.ClearField("contents")
    given.contents.uint_contents.extend([7] * 784)
    pixels = grpc_tensors.decode(request, tensors, max_body=MAX_BODY).inputs["pixels"]
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 28, 28) and pixels.max() == 7
    given.contents.uint_contents[0] = 300
    with pytest.raises(InputError, match=r"inputs\[0\] \(pixels\): a value is outside the range"):
        grpc_tensors.decode(request, tensors, max_body=MAX_BODY)
    del given.contents.uint_contents[0]
    with pytest.raises(InputError, match=r"783 values for shape \[1, 28, 28\] \(784 expected\)"):
        grpc_tensors.decode(request, tensors, max_body=MAX_BODY)
    given.datatype = "FP16"
    with pytest.raises(InputError, match="datatype FP16 is not accepted"):
        grpc_tensors.decode(request, tensors, max_body=MAX_BODY)
    half = np.ones((1, 2), np.float16)
    decoded = Decoded(RestInferRequest(inputs=[]), {})
    response = grpc_tensors.encode("m", "v", decoded, {"half": half}, [("half", False)], raw=False)
    assert response.raw_output_contents[0] == half.tobytes()  # FP16 has no typed field


def test_on_sigterm_grpc_says_not_serving_then_stops_listening(grpc_served) -> None:
    """Last: it drains the module's server (DLSERVE_DRAIN_DELAY_S=2)."""
    server, address = grpc_served
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while health(address) == SERVING:
        assert time.monotonic() < deadline, "still SERVING after SIGTERM"
        time.sleep(0.05)
    assert health(address) in (NOT_SERVING, None)
    deadline = time.monotonic() + 20
    while health(address) is not None:
        assert time.monotonic() < deadline, "still listening after the drain delay"
        time.sleep(0.1)
