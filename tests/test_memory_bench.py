"""The bench's memory section: one configuration measured in a fresh process, as
`dlserve bench --only memory` does for each, and its rendering; and the workers' trimming
of the memory their allocator holds free (service/lifecycle.py)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from bench.memory import CONFIGS, render, run_child

# A thread allocates 250 MiB in 64 KiB blocks (glibc serves them from the thread's arena,
# below its mmap threshold), then frees all but every 64th: scattered survivors keep the
# arena from shrinking, as the requests of a burst do. Prints RSS (MiB) once freed, and
# again after a second of trimming every 0.2 s (or not, with 0).
FRAGMENT = """
import sys, threading, time
import psutil
from service.lifecycle import start_trimming
kept = []
def churn():
    blocks = [b"x" * 65536 for _ in range(4000)]
    kept.extend(blocks[::64])
thread = threading.Thread(target=churn)
thread.start()
thread.join()
rss = lambda: psutil.Process().memory_info().rss / 2**20
freed = rss()
trimming = start_trimming(float(sys.argv[1]))
time.sleep(1.0)
print(freed, rss(), trimming)
"""


def fragmented(every_s: float) -> tuple[float, float, bool]:
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT, str(every_s)], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1]), out[2] == "True"


def test_a_configuration_is_measured_in_its_own_process(digits_model: str) -> None:
    config = next(c for c in CONFIGS if c.name.endswith("(dlserve)"))
    row = run_child("digits", config)
    steps = ("loaded_mib", "after_burst_mib", "after_small_mib", "after_varied_mib")
    assert all(row[k] > 50 for k in steps), row  # a Python process with ONNX Runtime
    assert row["items_per_s_1"] > 0 and row["items_per_s_64"] > row["items_per_s_1"], row
    lines = render(
        {
            "large_items": 256,
            "small_runs": 200,
            "varied_runs": 1000,
            "rows": [{"model": "digits", "config": config.name, **row}],
        },
        {},
    )
    assert lines[0] == "## Memory: ONNX Runtime's options after a burst"
    assert f"| digits | {config.name} | {row['loaded_mib']} |" in "\n".join(lines)


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "malloc_trim") or "jemalloc" in os.environ.get("LD_PRELOAD", ""),
    reason="glibc's allocator is not the one in use (malloc_trim is glibc's)",
)
def test_a_worker_returns_memory_its_allocator_holds_free() -> None:
    freed, later, trimming = fragmented(0)  # DLSERVE_MALLOC_TRIM_S=0: held
    assert not trimming and later > freed - 20, (freed, later)
    freed, later, trimming = fragmented(0.2)
    assert trimming and later < freed - 150, (freed, later)  # most of the 250 MiB returned
