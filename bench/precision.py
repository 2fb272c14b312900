"""The precision section: each model × precision × execution provider, in process.

For every precision variant in the model store (the latest version of each, as
DLSERVE_PRECISION would load it) and every provider that really initialises here, the
runner's items/s at one fixed batch and the model's held-out metric, beside its FP32
version's. A provider that cannot run here is listed as such, never given a figure.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bench import report
from bench.sections import BenchContext, Section
from bench.timing import median_seconds
from dlserve import registry, store
from dlserve.manifest import PRECISIONS
from dlserve.providers import SHORT_NAMES
from dlserve.registry import ModelSpec
from dlserve.runtime import cpu_threads

log = logging.getLogger("dlserve.bench")
BATCH = 64  # the service's default largest batch (DLSERVE_MAX_BATCH_SIZE)
PROVIDERS = ("tensorrt", "cuda", "cpu")


def measure(spec: ModelSpec, tag: str, provider: str, ctx: BenchContext) -> dict[str, Any]:
    """Items/s at BATCH and the held-out metric of one stored version on one provider."""
    workload, source = ctx.sources[spec.name]
    settings = ctx.settings.model_copy(update={"providers": (provider,)})
    stored = store.load(tag)
    try:
        runner = spec.runner.open(stored, settings)
    except RuntimeError as exc:  # the message ends with "<provider>: <why>)"
        name = SHORT_NAMES[provider]
        return {
            "provider": name,
            "usable": False,
            "why": str(exc).rsplit(f"{name}: ", 1)[-1].removesuffix(")")[:300],
        }
    pool = workload.parts(runner, source)(BATCH)
    seconds = median_seconds(lambda: runner.run_batch([pool]), repeats=5)
    metrics = spec.evaluate.load()(runner, source)
    plan = spec.precision
    metric = plan.metric if plan is not None else "accuracy"
    threads = cpu_threads(settings.ort_threads, settings.workers, len(os.sched_getaffinity(0)))
    return {
        "provider": runner.provider,
        "usable": True,
        "threads": threads,
        "items_per_s": round(BATCH / seconds),
        "metric": metric,
        "value": metrics.get(metric),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    known = registry.available(ctx.settings.model_modules)
    for name in ctx.sources:
        spec = known[name]
        for precision in PRECISIONS:
            if (tag := store.latest(name, precision)) is None:
                continue
            for provider in PROVIDERS:
                log.info("bench: precision %s %s on %s", tag, precision, provider)
                rows.append(
                    {
                        "model": name,
                        "precision": precision,
                        "tag": tag,
                        **measure(spec, tag, provider, ctx),
                    }
                )
    return {"batch": BATCH, "rows": rows}


def _against_fp32(rows: list[dict[str, Any]]) -> list[list[Any]]:
    fp32 = {
        (r["model"], r["provider"]): r for r in rows if r["usable"] and r["precision"] == "fp32"
    }
    out = []
    for r in rows:
        if not r["usable"]:
            continue
        base = fp32.get((r["model"], r["provider"]))
        speed = f"{r['items_per_s'] / base['items_per_s']:.2f}×" if base else "n/a"
        delta = (
            f"{r['value'] - base['value']:+.4f}"
            if base and r["value"] is not None and base["value"] is not None
            else "n/a"
        )
        out.append(
            [
                r["model"],
                r["precision"],
                r["provider"],
                f"{r['items_per_s']:,}",
                speed,
                f"{r['metric']} {r['value']}",
                delta,
            ]
        )
    return out


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    unusable = sorted({f"{x['provider']}: {x['why']}" for x in r["rows"] if not x["usable"]})
    return [
        "## Precision variants and execution providers",
        "",
        f"Each model's latest version of each precision in the model store (`dlserve export "
        f"MODEL --precision int8|fp16`), on each execution provider that really runs here: "
        f"the runner's items/s at batch {r['batch']} (in process, median of 5) and the "
        "model's held-out metric through ONNX Runtime (accuracy on MNIST test and SST-2 dev; "
        "RMSE on u1.test, lower is better), each against the FP32 version on the same provider.",
        "",
        report.table(
            [
                "model",
                "precision",
                "provider",
                f"items/s (batch {r['batch']})",
                "× fp32",
                "metric",
                "Δ vs fp32",
            ],
            _against_fp32(r["rows"]),
        ),
        "",
        *(
            [f"Not measured, not usable on this machine: {'; '.join(unusable)}.", ""]
            if unusable
            else []
        ),
    ]


SECTION = Section("precision", run, render)
