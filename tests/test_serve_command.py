"""`dlserve serve`, the README's main command, on an empty model store: it must say what is
missing, train and export it, then serve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from bench.http import free_port, stop_process_group, wait_ready


def test_serve_trains_and_exports_what_is_missing(tmp_path: Path, data_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"),
           "DLSERVE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "DLSERVE_MODELS": "digits"}  # one model is enough to prove the command
    log_path = tmp_path / "serve.log"
    cli = Path(sys.executable).with_name("dlserve")
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(cli), "serve", "--quick", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=240)
            (model,) = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"]
        finally:
            stop_process_group(proc)
    output = log_path.read_text()
    assert "model 'digits' is not trained yet: training it now (--quick)" in output
    assert "model 'digits' is not in the model store yet: exporting it now" in output
    assert model["tag"].startswith("digits:")
    assert (tmp_path / "artifacts/digits/checkpoint.pt").is_file()
