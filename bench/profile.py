"""`dlserve bench --only profile`: where one worker's CPU goes, under the digits cell.

One dlserve worker (DLSERVE_WORKERS=1) serving one JSON item per request to 64 wrk
clients, sampled by py-spy (the thread that holds the GIL, 100 samples/s: where Python's
time goes; ONNX Runtime runs with the GIL released, so its own time is not in it). Each sample is
charged to the innermost frame of dlserve's own code, or of the library it is in, so the
table reads as "time spent in": uvicorn's and asyncio's event loop and sockets, Starlette,
BentoML, pydantic, prometheus_client, ONNX Runtime, dlserve itself.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench import http, report
from bench.compare import requests_for
from bench.sections import BenchContext, Section

MODEL = "digits"  # the cell profiled, when digits is served; else the first model
SECONDS = 20
RATE = 100
# Frames whose file's first folder is one of these are this project's own code.
OWN = ("dlserve", "service", "readers", "bench")
STDLIB = {
    "asyncio",
    "concurrent",
    "threading.py",
    "selectors.py",
    "queue.py",
    "socket.py",
    "contextlib.py",
    "functools.py",
    "logging",
    "json",
    "enum.py",
    "typing.py",
    "weakref.py",
    "abc.py",
    "inspect.py",
    "re",
    "copy.py",
    "base64.py",
}


def place(frame: str) -> str:
    """Where a py-spy frame, "function (folder/file.py:line)", belongs: this project, the
    standard library, or the installed package it is in."""
    top = frame.rsplit("(", 1)[-1].split("/")[0].split(":")[0]
    if top in OWN:
        return "dlserve (its own code)"
    if top in STDLIB or top.startswith("<"):
        return "python (asyncio, threads, stdlib)"
    return top.removesuffix(".py")


def charge(stack: list[str]) -> str:
    """Where one sample's time is charged: the innermost frame that is not the standard
    library's plumbing (asyncio's loop, threading), which works for whoever called it."""
    for frame in reversed(stack):
        where = place(frame)
        if where != "python (asyncio, threads, stdlib)":
            return where
    return "python (asyncio, threads, stdlib)"


def run(ctx: BenchContext) -> dict[str, Any]:
    model = MODEL if MODEL in ctx.sources else next(iter(ctx.sources))
    server = http.dlserve_server("dlserve", list(ctx.sources), DLSERVE_WORKERS="1")
    requests = requests_for(model, 1, "json", ctx.sources)
    server.start()
    try:
        assert server.process is not None
        (worker,) = [
            p
            for p in psutil.Process(server.process.pid).children(recursive=True)
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
        ]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "stacks.txt"
            load = threading.Thread(
                target=http.run_wrk,
                args=(server.url, requests),
                kwargs={"clients": 64, "duration_s": SECONDS + 4},
            )
            load.start()
            subprocess.run(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--duration",
                    str(SECONDS),
                    "--rate",
                    str(RATE),
                    "--format",
                    "raw",
                    "--gil",
                    "--output",
                    str(out),
                ],
                capture_output=True,
                check=True,
            )
            load.join()
            lines = out.read_text().splitlines()
    finally:
        server.stop()
    places: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames:  # a sample of a thread with no Python frame yet
            continue
        places[charge(frames)] += int(count)
        leaves[frames[-1]] += int(count)
    total = sum(places.values())
    return {
        "model": model,
        "seconds": SECONDS,
        "samples": total,
        "places": {k: round(v / total, 4) for k, v in places.most_common()},
        "leaves": {k: round(v / total, 4) for k, v in leaves.most_common(15)},
    }


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    return [
        "## Where a worker's time goes (py-spy)",
        "",
        f"One dlserve worker serving {r['model']}, one JSON image per request, 64 clients, "
        f"sampled by py-spy for {r['seconds']} s ({r['samples']:,} samples of the thread "
        "holding the GIL: Python's time; ONNX Runtime runs without it). Each sample is "
        "charged to the innermost frame outside the standard "
        "library's plumbing: the library it is in, or dlserve's own folder. Reproduce with "
        "`dlserve bench --only profile`.",
        "",
        report.table(
            ["where", "share of samples"], [[k, f"{v:.1%}"] for k, v in r["places"].items()]
        ),
        "",
        "The innermost frames that took most samples:",
        "",
        report.table(["frame", "share"], [[f"`{k}`", f"{v:.1%}"] for k, v in r["leaves"].items()]),
        "",
    ]


SECTION = Section("profile", run, render)
