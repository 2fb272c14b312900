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
from bench.inprocess import median_seconds
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


def ceiling(runner: Any, make_part: Any, rows: int) -> float:
    """Items/s of runner.run_batch alone, BATCH items a call."""
    n = min(rows, CEILING_ITEMS) // BATCH * BATCH or BATCH
    pool = make_part(n)

    def run_all() -> None:
        for i in range(0, n, BATCH):
            runner.run_batch([pool[i: i + BATCH]])

    return n / median_seconds(run_all, repeats=REPEATS, min_time_s=0.5)


def job_for(name: str, data: BatchInput, out: Path, engine: str = "local") -> Job:
    return Job(model=name, input=data.path, output=out, engine=engine, batch_size=BATCH,
               overwrite=True, quiet=True, **data.options)


def engine_rate(ctx: BenchContext, job: Job) -> dict[str, Any]:
    rates = []
    for _ in range(REPEATS):
        counts = scoring.run(job, ctx.settings)
        assert counts is not None
        rates.append(counts.rows / counts.seconds)
    return {"rows_per_s": round(statistics.median(rates)), "rows": counts.rows,
            "rejected": counts.rejected, "unit": counts.unit}


def peak_rss_mib(name: str, data: BatchInput, out: Path) -> float:
    """Peak RSS of a `dlserve score` process scoring the input, from the kernel."""
    cli = Path(sys.executable).with_name("dlserve")
    options = {"batch_size": BATCH, **data.options}
    flags = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    errors = out.with_suffix(".log")
    with open(errors, "wb") as log_file:
        proc = subprocess.Popen([str(cli), "score", name, str(data.path), str(out),
                                 "--quiet", "--overwrite", *flags],
                                stdout=subprocess.DEVNULL, stderr=log_file)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise RuntimeError(f"dlserve score {name} failed: {errors.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024


def start_ray(actors: int) -> float | None:
    """Start a local Ray for the Ray engine's runs; its start-up seconds (None: no Ray)."""
    try:
        import ray
    except ImportError:
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith((PREFIX, "BENTOML_"))}
    started = time.perf_counter()
    ray.init(num_cpus=actors + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
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
            log.info("bench: %s batch input, %d rows", name, workload.batch_rows)
            full = workload.batch(source, folder, workload.batch_rows)
            tenth = workload.batch(source, folder, max(1, workload.batch_rows // 10))
            runner = registry.load_runner(name, ctx.settings)
            log.info("bench: %s batch scoring, local engine", name)
            local = engine_rate(ctx, job_for(name, full, folder / f"{name}.parquet"))
            top = ceiling(runner, workload.parts(runner, source), workload.batch_rows)
            rss = [peak_rss_mib(name, data, folder / f"{name}-rss.parquet")
                   for data in (tenth, full)]
            models.append({"model": name, "provider": runner.provider, **local,
                           "ceiling_items_per_s": round(top),
                           "ratio": round(local["rows_per_s"] / top, 3),
                           "rss_mib": [round(r) for r in rss], "rss_rows": [
                               workload.batch_rows // 10, workload.batch_rows],
                           "rss_growth": round(rss[1] / rss[0] - 1, 3)})
            plans.append((name, full))
        startup = start_ray(actors) if plans else None
        if startup is not None:
            import ray

            try:
                for (name, full), row in zip(plans, models, strict=True):
                    log.info("bench: %s batch scoring, Ray engine", name)
                    ray_job = replace(job_for(name, full, folder / f"{name}-ray.parquet", "ray"),
                                      ray_actors=actors)
                    row["ray_rows_per_s"] = engine_rate(ctx, ray_job)["rows_per_s"]
            finally:
                ray.shutdown()
    return {"batch_size": BATCH, "models": models, "ray_actors": actors,
            "ray_startup_s": None if startup is None else round(startup, 1)}


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    rows = [[m["model"], m["provider"].removesuffix("ExecutionProvider"),
             f"{m['rows']:,} {m['unit']}", f"{m['ceiling_items_per_s']:,}",
             f"{m['rows_per_s']:,}", f"{m['ratio']:.0%}",
             f"{m['ray_rows_per_s']:,}" if m.get("ray_rows_per_s") else "—",
             f"{m['rss_mib'][0]:,} / {m['rss_mib'][1]:,}", f"{m['rss_growth']:+.0%}"]
            for m in r["models"]]
    out = [
        "## Batch scoring (`dlserve score`)",
        "",
        f"Each model's batch input, generated at run time: MNIST test images repeated into a "
        f"Parquet file of raw pixels, SST-2 dev sentences repeated into a CSV, u1.base users' "
        f"ratings in u.data's layout (scored per user, top 10). The ceiling is the runner "
        f"alone in this process (`run_batch`, {r['batch_size']} items a call, one ONNX "
        f"Runtime thread); the engines score the file with `--batch-size "
        f"{r['batch_size']}` and their rows/s is the job's own time (read, check, run, "
        f"format, write, rename), median of {REPEATS} runs. The Ray engine runs "
        f"{r['ray_actors']} actors on a local Ray started once beforehand"
        + (f" (start-up {r['ray_startup_s']} s, not counted)" if r["ray_startup_s"] else
           " (Ray not installed: not measured)")
        + ". Peak RSS is that of a whole `dlserve score` process, for a tenth of the rows "
        "and for all of them.",
        "",
        report._table(["model", "provider", "rows", "ceiling (items/s)", "local engine "
                       "(rows/s)", "of ceiling", "Ray engine (rows/s)",
                       "peak RSS MiB (tenth / all)", "RSS growth"], rows),
        ""]
    return out


SECTION = Section("batch", run, render)
