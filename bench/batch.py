"""Batch scoring (`dlserve score`): the local engine against the in-process ceiling at the
same batch size, the Ray engine beside it, and peak memory for a tenth of the rows and all.

Every served model whose workload can write a batch input (`Workload.batch`) is scored
from a file generated at run time in a temporary folder (never committed). The ceiling is
`runner.run_batch` alone over the same kind of items at the same batch size, in this
process; the engines' rows/s are their own timing of the job (reading, checks, model,
answers, writing, final rename; not Python's start-up or the model's loading). Peak RSS is
that of a whole `dlserve score` process, from the kernel (wait4).
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report
from bench.sections import BenchContext, Section
from bench.workloads import BatchInput
from dlserve import registry
from dlserve.settings import PREFIX
from scoring import job as scoring
from scoring.adapters import Job

log = logging.getLogger("dlserve.bench")
BATCH = 256  # items per model run, for the engines and the ceiling alike
REPEATS = 3  # engine runs per model; the report takes the median
CEILING_ITEMS = 20_480


def ceiling_pass(runner: Any, pool: Any, items: int) -> float:
    """Items/s of runner.run_batch alone over `items` items (the pool, cycled), BATCH items
    a call."""
    started = time.perf_counter()
    done = 0
    while done < items:
        for i in range(0, len(pool), BATCH):
            runner.run_batch([pool[i : i + BATCH]])
        done += len(pool)
    return done / (time.perf_counter() - started)


def job_for(name: str, data: BatchInput, out: Path, engine: str = "local") -> Job:
    return Job(
        model=name,
        input=data.path,
        output=out,
        engine=engine,
        batch_size=BATCH,
        overwrite=True,
        quiet=True,
        **data.options,
    )


def engine_pass(ctx: BenchContext, job: Job) -> Any:
    counts = scoring.run(job, ctx.settings)
    assert counts is not None
    return counts


def side_by_side(
    ctx: BenchContext, runner: Any, make_part: Any, job: Job, rows: int
) -> dict[str, Any]:
    """The ceiling and the local engine, taking turns REPEATS times over the same number of
    items (the machine's load changes; turns see the same), medians of each."""
    pool = make_part(max(BATCH, min(CEILING_ITEMS, rows) // BATCH * BATCH))
    ceiling_pass(runner, pool[:BATCH], BATCH)  # warm-up
    tops, rates = [], []
    for _ in range(REPEATS):
        counts = engine_pass(ctx, job)
        rates.append(counts.rows / counts.seconds)
        tops.append(ceiling_pass(runner, pool, counts.rows))
    top, rate = statistics.median(tops), statistics.median(rates)
    return {
        "rows_per_s": round(rate),
        "rows": counts.rows,
        "rejected": counts.rejected,
        "unit": counts.unit,
        "ceiling_items_per_s": round(top),
        "ratio": round(rate / top, 3),
        "ratio_by_turn": [round(r / t, 3) for r, t in zip(rates, tops, strict=True)],
    }


# `dlserve score` in a process that reports its peak RSS at the end: VmHWM, the high-water
# mark of its own memory since exec (wait4's ru_maxrss would also count the RSS this
# process had when it forked the child).
RSS_PROBE = """import re, sys
from cli.main import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print("VmHWM", re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
sys.exit(code)
"""


def peak_rss_mib(name: str, data: BatchInput, out: Path) -> float:
    """Peak RSS of a `dlserve score` process scoring the input."""
    options = {"batch_size": BATCH, **data.options}
    flags = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RSS_PROBE,
            "score",
            name,
            str(data.path),
            str(out),
            "--quiet",
            "--overwrite",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"dlserve score {name} failed: {result.stderr[-2000:]}")
    return int(result.stdout.split("VmHWM")[-1]) / 1024


def start_ray(actors: int) -> float | None:
    """Start a local Ray for the Ray engine's runs; its start-up seconds (None: no Ray)."""
    try:
        import ray
    except ImportError:
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith((PREFIX, "BENTOML_"))}
    started = time.perf_counter()
    ray.init(
        num_cpus=actors + 1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    return time.perf_counter() - started


def run(ctx: BenchContext) -> dict[str, Any]:
    actors = len(os.sched_getaffinity(0))
    models: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dlserve-bench-batch-") as tmp:
        folder = Path(tmp)
        plans = []
        for name, (workload, source) in ctx.sources.items():
            if workload.batch is None:
                continue
            log.info("bench: %s batch inputs, %d rows", name, workload.batch_rows)
            inputs = workload.batch(source, folder, workload.batch_rows)
            runner = registry.load_runner(name, ctx.settings)
            make_part = workload.parts(runner, source)
            for n, data in enumerate(inputs):
                log.info(
                    "bench: %s batch scoring (%s), local engine and ceiling", name, data.layout
                )
                row = {
                    "model": name,
                    "layout": data.layout,
                    "provider": runner.provider,
                    **side_by_side(
                        ctx,
                        runner,
                        make_part,
                        job_for(name, data, folder / f"{name}-{n}.parquet"),
                        workload.batch_rows,
                    ),
                }
                if n == 0:  # memory and Ray: for the first layout
                    tenth = workload.batch(source, folder, max(1, workload.batch_rows // 10))[0]
                    rss = [
                        peak_rss_mib(name, d, folder / f"{name}-rss.parquet") for d in (tenth, data)
                    ]
                    row.update(
                        {
                            "rss_mib": [round(r) for r in rss],
                            "rss_rows": [workload.batch_rows // 10, workload.batch_rows],
                            "rss_growth": round(rss[1] / rss[0] - 1, 3),
                        }
                    )
                    plans.append((name, data, row))
                models.append(row)
        startup = start_ray(actors) if plans else None
        if startup is not None:
            import ray

            try:
                for name, full, row in plans:
                    log.info("bench: %s batch scoring, Ray engine", name)
                    ray_job = replace(
                        job_for(name, full, folder / f"{name}-ray.parquet", "ray"),
                        ray_actors=actors,
                    )
                    row["ray_rows_per_s"] = round(
                        statistics.median(
                            c.rows / c.seconds
                            for c in (engine_pass(ctx, ray_job) for _ in range(REPEATS))
                        )
                    )
            finally:
                ray.shutdown()
    return {
        "batch_size": BATCH,
        "models": models,
        "ray_actors": actors,
        "ray_startup_s": None if startup is None else round(startup, 1),
    }


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    rows = [
        [
            m["model"],
            m["layout"],
            m["provider"].removesuffix("ExecutionProvider"),
            f"{m['rows']:,} {m['unit']}",
            f"{m['ceiling_items_per_s']:,}",
            f"{m['rows_per_s']:,}",
            f"{m['ratio']:.0%} ({', '.join(f'{x:.0%}' for x in m['ratio_by_turn'])})",
            f"{m['ray_rows_per_s']:,}" if m.get("ray_rows_per_s") else "—",
            f"{m['rss_mib'][0]:,} / {m['rss_mib'][1]:,}" if "rss_mib" in m else "—",
            f"{m['rss_growth']:+.0%}" if "rss_mib" in m else "—",
        ]
        for m in r["models"]
    ]
    out = [
        "## Batch scoring (`dlserve score`)",
        "",
        "Each model's batch input, generated at run time: MNIST test images repeated into "
        "Parquet files of raw pixels (784 uint8 per row as lists, the layout the target is "
        "judged on, and as 784 bytes), SST-2 dev sentences repeated into a CSV, u1.base "
        "users' ratings in u.data's layout (scored per user, top 10). The ceiling is the "
        f"runner alone in this process (`run_batch`, {r['batch_size']} items a call, one "
        f"ONNX Runtime thread); the local engine scores the file with `--batch-size "
        f"{r['batch_size']}`, and its rows/s is the job's own time (read, check, run, "
        "format, write, final rename). Engine runs and ceiling passes over the same number "
        f"of items take turns, {REPEATS} each; the table gives the medians and each turn's "
        "ratio. The Ray engine (median of "
        f"{REPEATS} runs) uses {r['ray_actors']} actors on a local Ray started once beforehand"
        + (
            f" (start-up {r['ray_startup_s']} s, not counted; each run still starts its "
            "actors and loads the model in each)"
            if r["ray_startup_s"]
            else " (Ray not installed: not measured)"
        )
        + ". Peak RSS is the high-water mark of a whole `dlserve score` process, for a tenth "
        "of the rows and for all of them.",
        "",
        report.table(
            [
                "model",
                "input",
                "provider",
                "rows",
                "ceiling (items/s)",
                "local engine (rows/s)",
                "of ceiling (each turn)",
                "Ray engine (rows/s)",
                "peak RSS MiB (tenth / all)",
                "RSS growth",
            ],
            rows,
        ),
        "",
    ]
    return out


SECTION = Section("batch", run, render)
