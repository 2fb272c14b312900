"""The machine a benchmark ran on, and BENCHMARKS.md rendered from the JSON results."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime-gpu"),
        "bentoml": version("bentoml"),
        "gpu": "none",
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# Benchmarks",
        "",
        "Written by `dlserve bench` (do not edit by hand); the raw numbers are in "
        "`benchmarks.json`. Every figure is a median over repeats, measured side by side "
        "in one run on the machine below.",
        "",
        f"**Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, GPU: "
        f"{m['gpu']}; {m['os']}; Python {m['python']}, onnxruntime {m['onnxruntime']}, "
        f"bentoml {m['bentoml']}; {m['date']}.",
        "",
        "## In-process ceiling (ONNX Runtime alone, no HTTP)",
        "",
        "The model's runner (preprocessed input in, probabilities out) on one ONNX Runtime "
        "thread, over the same 256 held-out items at every batch size (MNIST test images; "
        "SST-2 dev sentences, about 20 tokens on average; MovieLens u1.base users, 85 ratings "
        "on average, each item one user's 1,682 expected ratings); items per second.",
        "",
    ]
    for c in results["ceiling"]:
        out += [f"**{c['model']}** ({c['provider']}): batch 1 {c['batch_1_items_per_s']:,} "
                f"items/s; best {c['best']['items_per_s']:,} items/s at batch "
                f"{c['best']['batch']}.", "",
                _table(["batch", "ms per batch", "items/s"],
                       [[r["batch"], r["ms_per_batch"], f"{r['items_per_s']:,}"]
                        for r in c["by_batch"]]), ""]
    if b := results.get("bucketing"):
        out += [
            "## Length bucketing (sentiment)",
            "",
            f"A batch of {b['batch']} texts: SST-2 dev sentences plus {b['long_texts']} long "
            "reviews (~200 tokens). Padding every text to the longest means "
            f"{b['tokens_padded']:,} LSTM token-steps for {b['tokens_real']:,} real tokens; "
            "the runner instead sorts texts by length and runs each length bucket on its own "
            "(`dlserve/models/sentiment.py`).",
            "",
            _table(["batch", "padded to longest (ms)", "length buckets (ms)", "speed-up"],
                   [[b["batch"], b["ms_padded"], b["ms_bucketed"], f"{b['speedup']}×"]]),
            "",
        ]
    return "\n".join(out)
