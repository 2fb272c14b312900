"""The digits routes over real HTTP against a real BentoML server (2 worker processes)."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dlserve import store
from readers.mnist import load_mnist
from tests.images import as_user_file, encode

N = 200


@pytest.fixture(scope="module")
def test_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    split = load_mnist(data_dir, "test")
    return split.images[:N], split.labels[:N]


def metric_total(client: httpx.Client, name: str, **labels: str) -> float:
    """Sum of a metric's samples on /metrics whose labels include `labels`."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_predict_arrays_is_accurate_on_real_test_images(client, test_digits, digits_model) -> None:
    images, labels = test_digits
    predicted = []
    for i in range(0, N, 50):
        r = client.post("/digits/predict", json={"images": images[i : i + 50].tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == digits_model
        for p in body["predictions"]:
            assert len(p["probabilities"]) == 10 and abs(sum(p["probabilities"]) - 1) < 1e-4
            assert p["confidence"] == max(p["probabilities"])
        predicted += [p["digit"] for p in body["predictions"]]
    assert np.mean(np.array(predicted) == labels) >= 0.97


def test_base64_pixels_give_the_same_predictions_as_arrays(client, test_digits) -> None:
    images = test_digits[0][:40]
    arrays = client.post("/digits/predict", json={"images": images.tolist()})
    compact = client.post(
        "/digits/predict",
        json={
            "images_base64": [
                base64.b64encode(img.astype(np.uint8).tobytes()).decode() for img in images
            ]
        },
    )
    assert arrays.status_code == compact.status_code == 200, compact.text
    assert compact.json()["predictions"] == arrays.json()["predictions"]


def test_predict_image_is_accurate_on_real_png_and_jpeg_files(client, test_digits) -> None:
    images, labels = test_digits
    correct = 0
    for i, (digit, label) in enumerate(zip(images, labels, strict=True)):
        data, content_type = as_user_file(digit, i % 4)
        r = client.post(
            "/digits/predict_image", content=data, headers={"Content-Type": content_type}
        )
        assert r.status_code == 200, r.text
        (prediction,) = r.json()["predictions"]
        correct += prediction["digit"] == label
    assert correct / N >= 0.97


def test_concurrent_requests_each_get_their_own_answer(client, test_digits, server) -> None:
    """Batched across requests on the server, but never mixed up between them."""
    images, _ = test_digits
    alone = [
        client.post("/digits/predict", json={"images": [img.tolist()]}).json()["predictions"][0][
            "probabilities"
        ]
        for img in images[:64]
    ]
    before = metric_total(client, "dlserve_batch_items_count", model="digits")

    def one(i: int) -> list[float]:
        with httpx.Client(base_url=server, timeout=30) as c:
            r = c.post("/digits/predict", json={"images": [images[i].tolist()]})
            assert r.status_code == 200
            return r.json()["predictions"][0]["probabilities"]

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, range(64)))
    assert np.allclose(together, alone, atol=1e-5)
    runs = metric_total(client, "dlserve_batch_items_count", model="digits") - before
    assert 0 < runs <= 64


def test_metrics_count_items_runs_and_errors_across_workers(client, test_digits) -> None:
    images, _ = test_digits
    items = metric_total(client, "dlserve_items_predicted_total", model="digits")
    errors = metric_total(client, "dlserve_errors_total", model="digits", reason="http_400")
    for _ in range(6):  # several requests, so both workers are likely to serve some
        assert client.post("/digits/predict", json={"images": images[:5].tolist()}).is_success
    assert client.post("/digits/predict", json={"images": []}).status_code == 400
    assert client.post("/digits/predict", json={"images": "x"}).status_code == 400
    assert metric_total(client, "dlserve_items_predicted_total", model="digits") == items + 30
    assert (
        metric_total(client, "dlserve_errors_total", model="digits", reason="http_400")
        == errors + 2
    )
    text = client.get("/metrics").text
    for name in (
        "dlserve_inference_seconds_bucket",
        "dlserve_preprocess_seconds_bucket",
        "dlserve_batch_items_bucket",
        "bentoml_service_request_total",
    ):
        assert name in text
    info = re.search(r"dlserve_model_info\{([^}]*)\} 1\.0", text)
    assert info and 'provider="CPUExecutionProvider"' in info.group(1)


def test_models_lists_tag_sha_provider_and_inputs(client, digits_model) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"digits", "sentiment", "recommender"}
    model = models["digits"]
    assert model["tag"] == digits_model and model["provider"] == "CPUExecutionProvider"
    assert model["sha256"] == store.load("digits").manifest.onnx_sha256
    assert model["inputs"][0]["shape"] == ["batch", 1, 28, 28]
    assert "test_accuracy_torch" in model["metrics"]


def test_health_endpoints(client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def png(size: tuple[int, int], fill: int = 0) -> bytes:
    img = Image.new("L", size, fill)
    if min(size) >= 8:
        img.paste(255, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] * 3 // 4))
    return encode(img)


GOOD = [[0] * 28] * 28
B64_GOOD = base64.b64encode(bytes(784)).decode()
BAD_ARRAYS = [
    ({"images": [[[0] * 28] * 27]}, 400, r"images\[0\]: expected a 28×28 .* got shape \(27, 28\)"),
    ({"images": [GOOD, [[0] * 27] * 28]}, 400, r"images\[1\]: .*got shape \(28, 27\)"),
    ({"images": [[[0] * 28] * 28 + [[0] * 3]]}, 400, r"images\[0\]: .*rows of unequal length"),
    ({"images": [[[300] * 28] * 28]}, 400, r"images\[0\]\[0\]\[0\]: 300 is outside .*0-255"),
    ({"images": [[[-1] + [0] * 27] * 28]}, 400, r"-1 is outside the pixel range"),
    ({"images": [[["a"] * 28] * 28]}, 400, r"images\[0\]\[0\]\[0\]: Input should be a valid num"),
    ({"images": [[[None] * 28] * 28]}, 400, r"images\[0\]\[0\]\[0\]: .*valid number"),
    ({"images": []}, 400, r"images: expected a non-empty list"),
    ({"images": "abc"}, 400, r"images: Input should be a valid (list|array)"),
    ({"pictures": [GOOD]}, 400, r"send exactly one of `images` .* and `images_base64`"),
    ({"images": [GOOD], "images_base64": [B64_GOOD]}, 400, r"send exactly one of"),
    ({"images_base64": [B64_GOOD, "not base64!"]}, 400, r"images_base64\[1\]: not a base64"),
    (
        {"images_base64": [base64.b64encode(bytes(783)).decode()]},
        400,
        r"images_base64\[0\]: 783 bytes once decoded; expected 784",
    ),
    ({"images_base64": [3]}, 400, r"images_base64\[0\]: Input should be a valid string"),
    ({"images_base64": []}, 400, r"images_base64: expected a non-empty list"),
    ({"images_base64": [B64_GOOD] * 257}, 413, r"257 images is more than the limit of 256"),
    ({"images": [GOOD] * 257}, 413, r"257 images is more than the limit of 256"),
]


@pytest.mark.parametrize("body, status, message", BAD_ARRAYS)
def test_bad_arrays_get_4xx_naming_the_problem(client, body, status, message) -> None:
    r = client.post("/digits/predict", json=body)
    assert r.status_code == status and re.search(message, r.json()["error"]), r.text
    assert client.post("/digits/predict", json={"images": [GOOD]}).status_code == 200


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            b'{"images": [[[NaN' + b", 0" * 27 + b"]" + b", [" + b"0, " * 27 + b"0]" * 27 + b"]]}",
            r"(not a finite number|valid number|JSON)",
        ),
        (
            b'{"images": [[[1e999'
            + b", 0" * 27
            + b"]"
            + b", ["
            + b"0, " * 27
            + b"0]" * 27
            + b"]]}",
            r"(not a finite number|valid number|JSON)",
        ),
        (
            b'{"images": [[[Infinity'
            + b", 0" * 27
            + b"]"
            + b", ["
            + b"0, " * 27
            + b"0]" * 27
            + b"]]}",
            r"(not a finite number|valid number|JSON)",
        ),
        (b"this is not json", r"body is not valid JSON"),
        (b'{"images": [[[0, 0', r"body is not valid JSON"),
    ],
)
def test_non_finite_numbers_and_broken_json_get_400(client, raw, message) -> None:
    r = client.post("/digits/predict", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and re.search(message, r.json()["error"]), r.text


BAD_FILES = [
    (b"", 400, r"body: empty; send one PNG or JPEG image"),
    (b"%PDF-1.4 not an image at all", 400, r"not a PNG or JPEG image"),
    (
        encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 60), np.uint8)))[
            :2000
        ],
        400,
        r"truncated or corrupt PNG",
    ),
    (png((1, 1), 255), 400, r"1×1 pixels is too small"),
    (png((10000, 10000)), 413, r"10000×10000 pixels is more than the limit"),
    (encode(Image.new("L", (40, 40), 200)), 400, r"no digit found"),
]


@pytest.mark.parametrize("data, status, message", BAD_FILES)
def test_bad_image_files_get_4xx_naming_the_problem(client, data, status, message) -> None:
    r = client.post("/digits/predict_image", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == status and re.search(message, r.json()["error"]), r.text
    ok = client.post(
        "/digits/predict_image", content=png((40, 40)), headers={"Content-Type": "image/png"}
    )
    assert ok.status_code == 200


def test_gif_is_unsupported_media(client) -> None:
    buf = io.BytesIO()
    Image.new("L", (40, 40), 0).save(buf, "GIF")
    r = client.post(
        "/digits/predict_image", content=buf.getvalue(), headers={"Content-Type": "image/gif"}
    )
    assert r.status_code == 415 and "GIF is not accepted" in json.loads(r.text)["error"]
