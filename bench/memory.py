"""`dlserve bench --only memory`: what ONNX Runtime's memory options hold after a burst, and
what they cost in speed.

Each configuration runs in a fresh process (so that one's memory cannot hide another's):
the model is loaded, run three times on a large request (256 items; for the sentiment
model, long texts of LONG_TOKENS tokens), then 200 times on small batches, as a worker
would be after one burst. Its resident memory is read after loading, after the burst and
after the small runs. The large request runs either as one 256-row model run or in runs
of at most max_batch_size rows, as the service's batcher splits it (service/batching.py).
Then the items/s of batches of 1 and 64 (medians of repeats) give the options' cost.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psutil

from bench import report
from bench.sections import BenchContext, Section
from bench.timing import median_seconds
from bench.workloads import sentiment_texts
from dlserve import registry
from dlserve.settings import load_settings
from service.batching import chunk_bounds

log = logging.getLogger("dlserve.bench")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2
LARGE = 256  # items in the large request (DLSERVE_MAX_ITEMS)
SMALL_RUNS = 200
# What "bounded runs" means, as the report states it (results measured before the LSTM's
# runs were bounded by tokens as well say "runs of 64").
BOUNDED = "bounded runs: at most 64 items, and for the LSTM 4,096 tokens, a run"
VARIED_RUNS = 1000


@dataclass(frozen=True)
class Config:
    name: str
    arena: bool  # ONNX Runtime's CPU arena
    pattern: bool  # its memory-pattern planning
    chunk: int | None  # most rows per model run of the large request; None: one run
    timed: bool  # measure items/s too (it depends on the options only, not on the chunks)
    env: tuple[tuple[str, str], ...] = ()  # the process's environment: the C allocator's


CONFIGS = (
    Config("arena, one 256-row run (before)", True, True, None, True),
    Config("arena, bounded runs", True, True, 64, False),
    Config("no arena, one 256-row run", False, True, None, False),
    Config("no arena, bounded runs (dlserve)", False, True, 64, True),
    Config("no arena, no pattern, bounded runs", False, False, 64, True),
    # glibc's malloc raises its mmap threshold after each large free, so later large
    # blocks come from its heaps and stay there; a fixed threshold hands each back.
    Config(
        "no arena, bounded runs, fixed mmap threshold",
        False,
        True,
        64,
        True,
        (("MALLOC_MMAP_THRESHOLD_", "131072"),),
    ),
    Config("no arena, bounded runs, jemalloc", False, True, 64, True, (("LD_PRELOAD", JEMALLOC),)),
)


def rss_mib() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def measure(model: str, config: Config) -> dict[str, Any]:
    """In this process: load `model` with `config`'s options, burst, small runs, timing."""
    settings = load_settings(ort_cpu_mem_arena=config.arena, ort_mem_pattern=config.pattern)
    spec = registry.available(settings.model_modules)[model]
    source = spec.data(settings)
    make_part = spec.workload.load().parts
    runner = spec.load_runner(settings)
    runner.warm_up()
    if model == "sentiment":
        long = sentiment_texts(runner, source)[1]  # ~90 of them: repeated up to LARGE
        large = [long[i % len(long)] for i in range(LARGE)]
    else:
        large = make_part(runner, source)(LARGE)
    small = make_part(runner, source)(64)
    out: dict[str, Any] = {"loaded_mib": rss_mib()}
    if config.chunk is None:
        bounds = [(0, LARGE)]
    else:  # as the service's batcher splits the request: by items, and by the run's cost
        costs = runner.item_costs(large) if runner.run_budget else [1] * LARGE
        bounds = [
            (a, b) for a, b, _ in chunk_bounds(costs, config.chunk, runner.run_budget or LARGE)
        ]
    for _ in range(3):
        for start, end in bounds:
            runner.run_batch([large[start:end]])
    out["after_burst_mib"] = rss_mib()
    for i in range(SMALL_RUNS):
        n = 1 + i % 8
        runner.run_batch([small[:n]])
    out["after_small_mib"] = rss_mib()
    # Many distinct input shapes, as a long-running service sees: ONNX Runtime plans memory
    # per input shape and keeps each plan, so this is where a slow growth would show.
    rng = np.random.default_rng(0)
    for _ in range(VARIED_RUNS):
        if model == "sentiment":  # few texts, so that this stays quick; all one length
            n, length = int(rng.integers(1, 9)), int(rng.integers(1, 201))
            part = [large[int(rng.integers(LARGE))][:length] for _ in range(n)]
        else:
            part = small[: int(rng.integers(1, 65))]
        runner.run_batch([part])
    out["after_varied_mib"] = rss_mib()
    if config.timed:
        for batch in (1, 64):
            seconds = median_seconds(lambda b=batch: runner.run_batch([small[:b]]), repeats=5)
            out[f"items_per_s_{batch}"] = round(batch / seconds)
    return out


def run_child(model: str, config: Config) -> dict[str, Any]:
    """`measure` in a fresh Python process; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", model, json.dumps(asdict(config))],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **dict(config.env)},
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench memory {model} {config.name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: BenchContext) -> dict[str, Any]:
    rows = []
    for model in ctx.sources:
        for config in CONFIGS:
            if any(k == "LD_PRELOAD" and not os.path.exists(v) for k, v in config.env):
                log.warning("bench: memory: %s skipped (apt-get install libjemalloc2)", config.name)
                continue
            log.info("bench: memory, %s, %s", model, config.name)
            rows.append({"model": model, "config": config.name, **run_child(model, config)})
    return {
        "large_items": LARGE,
        "small_runs": SMALL_RUNS,
        "varied_runs": VARIED_RUNS,
        "bounded": BOUNDED,
        "rows": rows,
    }


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    rows = [
        [
            x["model"],
            x["config"],
            x["loaded_mib"],
            x["after_burst_mib"],
            x["after_small_mib"],
            f"{x['after_small_mib'] / x['loaded_mib']:.2f}×",
            x["after_varied_mib"],
            f"{x['items_per_s_1']:,}" if "items_per_s_1" in x else "",
            f"{x['items_per_s_64']:,}" if "items_per_s_64" in x else "",
        ]
        for x in r["rows"]
    ]
    return [
        "## Memory: ONNX Runtime's options after a burst",
        "",
        f"One process per row (`dlserve bench --only memory`): the model loaded and warmed "
        f"up, then three requests of {r['large_items']} items (sentiment: long texts), then "
        f"{r['small_runs']} batches of 1-8 items, then {r['varied_runs']:,} batches of 1-64 "
        "items of varied shapes (sentiment: 1-8 texts cut to one length of 1-200 tokens); "
        "resident memory "
        "(MiB) after each step. "
        f'"{r.get("bounded", "runs of 64")}" splits the large request as the service\'s '
        "batcher did when measured. Items/s: "
        "batches of 1 and 64, in-process, medians of 5 repeats (one thread).",
        "",
        report.table(
            [
                "model",
                "configuration",
                "loaded",
                "after burst",
                "after small runs",
                "kept ×",
                "after varied shapes",
                "items/s at 1",
                "items/s at 64",
            ],
            rows,
        ),
        "",
    ]


SECTION = Section("memory", run, render)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    fields = json.loads(sys.argv[2])
    config = Config(**{**fields, "env": tuple(tuple(e) for e in fields["env"])})
    print(json.dumps(measure(sys.argv[1], config)))
