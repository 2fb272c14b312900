"""The Open Inference Protocol (KServe v2 REST) against the real server, with the real clients
of Triton (`tritonclient[http]`) and KServe (`kserve`): metadata, health, JSON and binary
tensors for all three models, answers identical to the JSON routes, and clear 4xx errors."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from dlserve import registry
from dlserve.settings import get_settings
from readers.mnist import load_mnist
from readers.sst2 import load_sst2

N = 24
USER = [(50, 5.0), (172, 4.5), (181, 4.0), (1, 2.0)]


@pytest.fixture(scope="module")
def tc(server: str) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(urlsplit(server).netloc)
    # Readiness is each worker's own, and a worker may still be loading when the server
    # first answers ready; wait until both do, several times in a row.
    deadline, in_a_row = time.monotonic() + 120, 0
    while in_a_row < 10 and time.monotonic() < deadline:
        ready = all(client.is_model_ready(m) for m in registry.serving(get_settings()))
        in_a_row = in_a_row + 1 if ready else 0
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def images(data_dir: Path) -> np.ndarray:
    return load_mnist(data_dir, "test").images[:N]


def digits_input(pixels: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def test_server_and_model_metadata_describe_every_registered_model(tc) -> None:
    assert tc.is_server_live() and tc.is_server_ready()
    meta = tc.get_server_metadata()
    assert meta["name"] == "dlserve" and "binary_tensor_data" in meta["extensions"]
    for name, spec in registry.serving(get_settings()).items():
        assert tc.is_model_ready(name)
        model = tc.get_model_metadata(name)
        assert model["name"] == name and model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [t.metadata() for t in spec.tensors.inputs]
        assert model["outputs"] == [t.metadata() for t in spec.tensors.outputs]
        (version,) = model["versions"]
        assert tc.get_model_metadata(name, version)["versions"] == [version]
        assert tc.is_model_ready(name, version)


@pytest.mark.parametrize(
    "datatype, shape, binary",
    [
        ("UINT8", (N, 28, 28), True),
        ("UINT8", (N, 28, 28), False),
        ("FP32", (N, 1, 28, 28), True),
        ("FP32", (N, 28, 28), False),
    ],
)
def test_digits_tensors_answer_as_the_json_route(
    tc, client, images, datatype, shape, binary
) -> None:
    ours = client.post("/digits/predict", json={"images": images.tolist()}).json()
    pixels = images.astype(np.float32 if datatype == "FP32" else np.uint8).reshape(shape)
    result = tc.infer(
        "digits",
        [digits_input(pixels, datatype, binary)],
        request_id="r-1",
        outputs=[
            triton.InferRequestedOutput("digit", binary_data=binary),
            triton.InferRequestedOutput("probabilities", binary_data=binary),
        ],
    )
    assert result.get_response()["id"] == "r-1"
    assert result.as_numpy("digit").tolist() == [p["digit"] for p in ours["predictions"]]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"),
        [p["probabilities"] for p in ours["predictions"]],
        atol=1e-6,
    )


def test_sentiment_bytes_tensors_answer_as_the_json_route(tc, client, data_dir) -> None:
    texts = load_sst2(data_dir, "dev").texts[:N] + ["Ça déçoit, vraiment. 😞"]
    ours = client.post("/sentiment/predict", json={"texts": texts}).json()["predictions"]
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = tc.infer("sentiment", [tensor])  # every output, as binary
    assert [x.decode() for x in result.as_numpy("label")] == [p["label"] for p in ours]
    np.testing.assert_allclose(
        result.as_numpy("positive_probability"),
        [p["positive_probability"] for p in ours],
        atol=1e-6,
    )


def test_recommender_tensors_answer_as_the_json_routes(tc, client) -> None:
    ratings = [{"movie_id": m, "rating": r} for m, r in USER]
    recs = client.post("/recommender/recommend", json={"ratings": ratings, "k": 7}).json()
    asked = [2, 3, 98, 100]
    preds = client.post(
        "/recommender/predict", json={"ratings": ratings, "movie_ids": asked}
    ).json()
    ids, stars, movies = (
        triton.InferInput(n, [len(v)], t)
        for n, v, t in (
            ("rated_movie_ids", USER, "INT64"),
            ("ratings", USER, "FP32"),
            ("movie_ids", asked, "INT64"),
        )
    )
    ids.set_data_from_numpy(np.array([m for m, _ in USER], np.int64))
    stars.set_data_from_numpy(np.array([r for _, r in USER], np.float32), binary_data=False)
    movies.set_data_from_numpy(np.array(asked, np.int64))
    result = tc.infer("recommender", [ids, stars, movies], parameters={"k": 7})
    assert result.as_numpy("recommended_movie_ids").tolist() == [
        m["movie_id"] for m in recs["recommendations"]
    ]
    assert [t.decode() for t in result.as_numpy("recommended_titles")] == [
        m["title"] for m in recs["recommendations"]
    ]
    np.testing.assert_allclose(
        result.as_numpy("predicted_ratings"),
        [p["predicted_rating"] for p in preds["predicted_ratings"]],
        atol=1e-4,
    )


def test_the_kserve_client_infers_with_json_and_binary_tensors(server, client, images) -> None:
    ours = client.post("/digits/predict", json={"images": images.tolist()}).json()
    expected = [p["digit"] for p in ours["predictions"]]

    async def ask() -> list[list[int]]:
        kserve = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        assert await kserve.is_server_ready(server)
        assert await kserve.is_model_ready(server, "digits")
        answers = []
        for binary in (False, True):
            tensor = InferInput("pixels", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            response = await kserve.infer(
                server, InferRequest("digits", [tensor]), model_name="digits"
            )
            digit = next(o for o in response.outputs if o.name == "digit")
            answers.append(digit.as_numpy().tolist())
        return answers

    assert asyncio.run(ask()) == [expected, expected]


def raw_infer(server: str, model: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{server}/v2/models/{model}/infer", json=body, headers=headers)


PIXELS = {"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}


@pytest.mark.parametrize(
    "model, body, status, message",
    [
        (
            "digits",
            {"inputs": [{**PIXELS, "shape": [1, 27, 28], "data": [0] * 756}]},
            400,
            r"pixels: expected shape \[N, 28, 28\]",
        ),
        (
            "digits",
            {"inputs": [{**PIXELS, "datatype": "INT64"}]},
            400,
            r"inputs\[0\] \(pixels\): datatype INT64 is not accepted; send UINT8 or FP32",
        ),
        (
            "digits",
            {"inputs": [{**PIXELS, "data": [0] * 783}]},
            400,
            r"783 values for shape \[1, 28, 28\] \(784 expected\)",
        ),
        (
            "digits",
            {"inputs": [{**PIXELS, "data": [300] * 784}]},
            400,
            r"outside the range of UINT8",
        ),
        (
            "digits",
            {"inputs": [{**PIXELS, "datatype": "FP32", "data": [-1.0] * 784}]},
            400,
            r"pixels\[0\]\[0\]\[0\]: -1 is outside the pixel range 0-255",
        ),
        (
            "digits",
            {"inputs": [{**PIXELS, "name": "image"}]},
            400,
            r"no input of that name; this model takes pixels",
        ),
        ("digits", {"inputs": []}, 400, r"inputs: missing pixels"),
        (
            "digits",
            {"inputs": [PIXELS], "outputs": [{"name": "logits"}]},
            400,
            r"outputs\[0\] \(logits\): no output of that name",
        ),
        (
            "digits",
            {"inputs": [{**PIXELS, "shape": [257, 28, 28], "data": [0] * 784 * 257}]},
            413,
            r"257 images is more than the limit of 256",
        ),
        ("digits", {"inputs": "x"}, 400, r"inputs: Input should be a valid (list|array)"),
        (
            "sentiment",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["   "]}]},
            400,
            r"text\[0\]: the text is empty",
        ),
        (
            "recommender",
            {
                "inputs": [
                    {"name": "rated_movie_ids", "shape": [1], "datatype": "INT64", "data": [99999]},
                    {"name": "ratings", "shape": [1], "datatype": "FP32", "data": [4.0]},
                ]
            },
            400,
            r"rated_movie_ids\[0\]: movie 99999 is not in the catalogue",
        ),
        (
            "recommender",
            {
                "inputs": [
                    {"name": "rated_movie_ids", "shape": [0], "datatype": "INT64", "data": []},
                    {"name": "ratings", "shape": [0], "datatype": "FP32", "data": []},
                ],
                "parameters": {"k": "ten"},
            },
            400,
            r"parameters.k: expected int",
        ),
        ("cats", {"inputs": [PIXELS]}, 404, r"model 'cats' is not served here"),
    ],
)
def test_bad_infer_requests_get_a_4xx_naming_the_problem(
    server, model, body, status, message
) -> None:
    r = raw_infer(server, model, body)
    assert r.status_code == status and re.search(message, r.json()["error"]), r.text
    assert raw_infer(server, "digits", {"inputs": [PIXELS]}).status_code == 200


def test_binary_sizes_versions_and_body_types_are_checked(server) -> None:
    head = (
        b'{"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8", '
        b'"parameters": {"binary_data_size": 784}}]}'
    )
    url = f"{server}/v2/models/digits/infer"
    ok = httpx.post(
        url, content=head + bytes(784), headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert ok.status_code == 200, ok.text
    outputs = {o["name"]: o for o in ok.json()["outputs"]}
    assert outputs["digit"]["shape"] == [1] and len(outputs["probabilities"]["data"]) == 10
    short = httpx.post(
        url, content=head + bytes(700), headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert short.status_code == 400 and "does not fit the 700 bytes" in short.json()["error"]
    extra = httpx.post(
        url, content=head + bytes(800), headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert extra.status_code == 400 and "16 bytes of binary data" in extra.json()["error"]
    version = httpx.post(
        f"{server}/v2/models/digits/versions/nope/infer", json={"inputs": [PIXELS]}
    )
    assert version.status_code == 404 and "has no version 'nope'" in version.json()["error"]
    pickle = httpx.post(
        url, content=b"\x80\x04.", headers={"Content-Type": "application/python-pickle"}
    )
    assert pickle.status_code == 415 and "never unpickles" in pickle.json()["error"]
    assert httpx.get(f"{server}/v2/models/cats").status_code == 404


def test_infer_requests_are_batched_and_counted_like_the_json_routes(server, client) -> None:
    def total(name: str) -> float:
        text = client.get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and 'model="digits"' in line
        )

    before = total("dlserve_items_predicted_total")
    body = {"inputs": [{**PIXELS, "shape": [3, 28, 28], "data": [0] * 784 * 3}]}
    for _ in range(4):
        assert raw_infer(server, "digits", body).status_code == 200
    assert total("dlserve_items_predicted_total") == before + 12
