"""`dlserve bench --only perf_analyzer`: Triton's own load tool against dlserve's Open
Inference Protocol route, beside the bench's own figures for the JSON routes.

perf_analyzer (installed into .tools/ by `make bench-tools`: bench/install-perf-analyzer.sh)
reads the model's metadata and configuration from /v2/models/<name>[/config], sends one
random item per request from `concurrency` synchronous clients, and reports throughput and
latency percentiles; it runs here with binary tensors (its default) and JSON tensors.
"""

from __future__ import annotations

import csv
import io
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import http, report
from bench.sections import BenchContext, Section

log = logging.getLogger("dlserve.bench")
TOOL = http.PROJECT_ROOT / ".tools" / "bin" / "perf_analyzer"
MODEL = "digits"
CONCURRENCY = (1, 16, 64)
FORMATS = ("binary", "json")


def command(
    url: str, concurrency: int, tensor_format: str, window_ms: int, csv_path: Path
) -> list[str]:
    return [
        str(TOOL),
        "-m",
        MODEL,
        "-u",
        url.removeprefix("http://"),
        "-i",
        "http",
        "-b",
        "1",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--input-tensor-format",
        tensor_format,
        "--output-tensor-format",
        tensor_format,
        "--measurement-interval",
        str(window_ms),
        # perf_analyzer aborts unless its last three windows agree within this share; on
        # a shared 2-core machine they rarely agree within its default 10 %, or 50 %.
        "--stability-percentage",
        "300",
        "--max-trials",
        "4",
        "-f",
        str(csv_path),
    ]


def measure(
    url: str, concurrency: int, tensor_format: str, window_ms: int, tmp: Path
) -> dict[str, Any]:
    path = tmp / f"pa-{concurrency}-{tensor_format}.csv"
    cmd = command(url, concurrency, tensor_format, window_ms, path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=window_ms / 1000 * 20 + 60)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"perf_analyzer failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}"
        )
    (row,) = csv.DictReader(io.StringIO(path.read_text()))
    return {
        "concurrency": concurrency,
        "format": tensor_format,
        "infer_per_s": round(float(row["Inferences/Second"]), 1),
        **{f"p{p}": round(int(row[f"p{p} latency"]) / 1000, 2) for p in (50, 90, 99)},
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    if not TOOL.is_file():
        where = TOOL.relative_to(http.PROJECT_ROOT)
        return {
            "skipped": f"perf_analyzer is not installed at {where} "
            "(`make perf-analyzer` installs it)"
        }
    if MODEL not in ctx.sources:
        # perf_analyzer sends random tensors, which only digits' UINT8 pixels all accept.
        return {"skipped": f"it measures {MODEL}, which DLSERVE_MODELS does not serve"}
    server = http.dlserve_server(
        "dlserve", list(ctx.sources), DLSERVE_WORKERS=str(ctx.settings.workers)
    )
    window_ms = int(ctx.short_s * 1000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlserve-perf-analyzer-") as scratch:
        tmp = Path(scratch)
        server.start()
        try:
            for concurrency in CONCURRENCY:
                for tensor_format in FORMATS:
                    log.info(
                        "bench: perf_analyzer %s, %d clients, %s tensors",
                        MODEL,
                        concurrency,
                        tensor_format,
                    )
                    rows.append(measure(server.url, concurrency, tensor_format, window_ms, tmp))
        finally:
            server.stop()
    shown = " ".join(command("http://127.0.0.1:3000", 16, "binary", window_ms, Path("out.csv")))
    return {
        "model": MODEL,
        "workers": ctx.settings.workers,
        "runs": rows,
        "command": shown.replace(str(http.PROJECT_ROOT) + "/", ""),
    }


def render(r: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    title = "## Triton's perf_analyzer against the Open Inference Protocol route"
    if "skipped" in r:
        return [title, "", f"Not measured in this run: {r['skipped']}.", ""]
    ours = {
        (x["clients"], x.get("encoding", "json")): x
        for x in sections.get("http", {}).get("runs", [])
        if x["model"] == r["model"] and x["items"] == 1 and x["server"] == "dlserve"
    }
    rows = []
    for x in r["runs"]:
        same = ours.get((x["concurrency"], "json"))
        route = f"`/v2/models/{r['model']}/infer`, {x['format']} tensors"
        rows.append(
            [
                x["concurrency"],
                route,
                f"{x['infer_per_s']:,.0f}",
                x["p50"],
                x["p99"],
                f"{same['requests_per_s']:,.0f} / {same['p50']} / {same['p99']}" if same else "—",
            ]
        )
    return [
        title,
        "",
        f"perf_analyzer (Triton's load tool, unchanged) against dlserve's `/v2` infer route "
        f"for {r['model']}, one random 28×28 UINT8 image per request, {r['workers']} worker "
        "process(es), with binary tensors (its default: 784 raw bytes after a small JSON "
        "header) and with JSON tensors. The last column is `dlserve bench`'s own figure for "
        'the JSON route `/digits/predict` at the same number of clients (wrk; "Over HTTP" '
        "above; requests/s / p50 ms / p99 ms), when that section has run. Reproduce one row "
        f"with `{r['command']}` against a running `dlserve serve`.",
        "",
        report.table(
            ["clients", "route and encoding", "requests/s", "p50 ms", "p99 ms", "JSON route (wrk)"],
            rows,
        ),
        "",
    ]


SECTION = Section("perf_analyzer", run, render)
