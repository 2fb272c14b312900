"""No deserialization of untrusted data: a crafted pickle, which would create a marker file
if anything unpickled it, is sent to every port the server listens on and planted as a
training checkpoint; ONNX weights that point outside the model's folder are refused."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from bench.http import Server
from dlserve.manifest import ModelIntegrityError, check_external_data
from tests.conftest import dlserve

PICKLE_TYPES = (
    "application/vnd.bentoml+pickle",
    "application/python-pickle",
    "application/x-pickle",
)
ROUTES = (
    "/digits/predict",
    "/digits/predict_image",
    "/sentiment/predict",
    "/recommender/recommend",
    "/recommender/predict",
    "/models",
    "/",
)


class Exploit:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "pickle-ran"
    # The exploit itself works: loading it really would create the marker.
    pickle.loads(pickle.dumps(Exploit(path)))
    assert path.exists()
    path.unlink()
    return path


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the server's processes listen on."""
    root = psutil.Process(pid)
    pids = {root.pid, *(p.pid for p in root.children(recursive=True))}
    # One read of the kernel's table (psutil.net_connections works with psutil 5 and 6;
    # kserve, a test dependency, holds psutil below 6).
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="tcp")
        if c.pid in pids and c.status == psutil.CONN_LISTEN
    }


def test_a_crafted_pickle_never_runs_on_any_port(running_server: Server, marker: Path) -> None:
    payload = pickle.dumps(Exploit(marker))
    http_port = int(running_server.url.rsplit(":", 1)[1])
    ports = listening_ports(running_server.process.pid)
    assert any(port == http_port for _, port in ports), ports
    for host, port in ports:
        if port == http_port:
            for route in ROUTES:
                for kind in PICKLE_TYPES:
                    r = httpx.post(
                        f"{running_server.url}{route}",
                        content=payload,
                        headers={"Content-Type": kind},
                    )
                    assert r.status_code == 415, (route, kind, r.text)
                    assert "never unpickles" in r.json()["error"]
        else:
            # BentoML's process manager (circus) keeps control sockets, which speak ZeroMQ
            # with JSON messages, not HTTP; they must not be reachable from outside.
            assert host == "127.0.0.1", (host, port)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(
                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/vnd.bentoml+pickle\r\nContent-Length: %d\r\n\r\n"
                    % len(payload)
                    + payload
                )
                sock.sendall(payload)
    time.sleep(1)
    assert not marker.exists(), "a pickle sent by a client was unpickled"
    assert httpx.get(running_server.url + "/readyz").status_code == 200


def test_a_pickled_checkpoint_is_refused_by_export(
    digits_model: str, marker: Path, tmp_path: Path
) -> None:
    import torch

    artifacts = Path(os.environ["DLSERVE_ARTIFACTS_DIR"])
    shutil.copytree(artifacts / "digits", tmp_path / "artifacts" / "digits")
    torch.save(
        {"conv1.weight": Exploit(marker)}, tmp_path / "artifacts" / "digits" / "checkpoint.pt"
    )
    result = dlserve(
        "export",
        "digits",
        check=False,
        env={
            "DLSERVE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
            "BENTOML_HOME": str(tmp_path / "bentoml"),
        },
    )
    assert result.returncode != 0
    assert "weights_only" in result.stderr or "Unpickl" in result.stderr, result.stderr[-2000:]
    assert not marker.exists(), "torch.load ran code from a checkpoint"


def onnx_with_external_weight(folder: Path, location: str) -> Path:
    """A one-node ONNX model (y = x + w) whose weight w is read from `location`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[w],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize(
    "location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin", ""]
)
def test_external_weights_outside_the_model_folder_are_refused(
    tmp_path: Path, location: str
) -> None:
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    path = onnx_with_external_weight(tmp_path / "model", location)
    with pytest.raises(ModelIntegrityError, match=r"tensor 'w' reads its data from .*outside"):
        check_external_data(path)


def test_external_weights_inside_the_model_folder_are_allowed(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0" * 16)
    check_external_data(onnx_with_external_weight(tmp_path / "model", "weights.bin"))
