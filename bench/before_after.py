"""`python -m bench.before_after CHECKOUT`: this checkout's dlserve against another's, side
by side in one run, on the cells the throughput targets are judged on (each model, one item
per request, 64 clients), so that a change's cost is measured against what it replaces.

CHECKOUT is another working tree of this repository (e.g. `git worktree add /tmp/before
HEAD~3`); its server runs its own code (its folder first on the Python path) with this
environment's packages and model store. Both servers take turns in a rotating order, round
after round, the one not under load paused (bench/compare.py); the table gives medians and
the ratio after ÷ before.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

from bench import compare, http, report
from bench.compare import Cell
from dlserve import registry
from dlserve.settings import load_settings

log = logging.getLogger("dlserve.bench")
CLIENTS = 64


def checkout_server(name: str, root: Path, models: list[str], workers: int) -> http.Server:
    """dlserve as `dlserve_server` starts it, from the code in `root`, on the allocator
    that code chooses for itself (an older checkout knows no DLSERVE_ALLOCATOR: glibc's)."""
    server = http.dlserve_server(
        name, models, DLSERVE_WORKERS=str(workers), PYTHONPATH=str(root), DLSERVE_ALLOCATOR="system"
    )
    server.cwd = root
    server.command = [*server.command, "--working-dir", str(root)]
    return server


def compare_checkouts(before: Path, *, seconds: int, rounds: int, workers: int) -> str:
    settings = load_settings(workers=workers)
    sources = {
        name: (spec.workload.load(), spec.data(settings))
        for name, spec in registry.serving(settings).items()
    }
    models = list(sources)
    servers = [
        checkout_server("before", before.resolve(), models, workers),
        http.dlserve_server("after", models, DLSERVE_WORKERS=str(workers)),
    ]
    cells = [Cell(m, 1, CLIENTS, seconds, rounds=rounds) for m in models]
    rows = compare.with_servers(servers, lambda: compare.run_cells(servers, cells, sources))
    table = []
    for model in models:
        med = {
            s.name: {
                k: statistics.median(
                    r[k] for r in rows if r["model"] == model and r["server"] == s.name
                )
                for k in ("requests_per_s", "p99")
            }
            for s in servers
        }
        errors = sum(r["non_2xx"] + r["socket_errors"] for r in rows if r["model"] == model)
        table.append(
            [
                model,
                f"{med['before']['requests_per_s']:,.0f}",
                f"{med['after']['requests_per_s']:,.0f}",
                f"{med['after']['requests_per_s'] / med['before']['requests_per_s']:.3f}×",
                med["before"]["p99"],
                med["after"]["p99"],
                errors,
            ]
        )
    return report.table(
        [
            "model",
            "before req/s",
            "after req/s",
            "after ÷ before",
            "before p99 ms",
            "after p99 ms",
            "non-2xx + socket errors",
        ],
        table,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the other checkout (the baseline)")
    parser.add_argument("--seconds", type=int, default=20, help="seconds per run (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="workers per server (default 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(
        compare_checkouts(
            args.before, seconds=args.seconds, rounds=args.rounds, workers=args.workers
        )
    )


if __name__ == "__main__":
    main()
