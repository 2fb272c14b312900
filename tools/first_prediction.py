"""How long a newcomer waits: `make serve` on a fresh clone of this checkout's HEAD (its own
virtual environment, model store and artefacts), until the first model answers a
prediction. Prints each model's seconds to its first 200, then stops the server.

    DLSERVE_DATA_DIR=../shared/data python3 tools/first_prediction.py [--models N]

The README's quick start quotes its result on the 2-core machine. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 3917
# One request per model, to the route its quick-start example uses.
REQUESTS = {
    "recommender": ("/recommender/recommend", {"ratings": [{"movie_id": 50, "rating": 5}]}),
    "digits": ("/digits/predict", {"images": [[[0] * 28] * 28]}),
    "sentiment": ("/sentiment/predict", {"texts": ["Fine."]}),
}


def answers(path: str, body: object) -> bool:
    url, data = f"http://127.0.0.1:{PORT}{path}", json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1, help="stop once this many answer")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dlserve-fresh-"))
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(scratch / "clone")], check=True)
    env = {**os.environ, "BENTOML_HOME": str(scratch / "bentoml"), "DLSERVE_PORT": str(PORT)}
    log = (scratch / "serve.log").open("w")
    started = time.monotonic()
    make = subprocess.Popen(
        ["make", "serve"],
        cwd=scratch / "clone",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    first: dict[str, float] = {}
    try:
        while len(first) < args.models and make.poll() is None:
            if time.monotonic() - started > args.timeout_s:
                break
            for name, (path, body) in REQUESTS.items():
                if name not in first and answers(path, body):
                    first[name] = round(time.monotonic() - started, 1)
            time.sleep(1)
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=120)
    print(json.dumps({"seconds_to_first_200": first, "log": str(scratch / "serve.log")}))


if __name__ == "__main__":
    main()
