"""The `dlserve` command line's arguments: one function per subcommand, in --help order.

Only the declarations live here; the commands themselves are in cli/main.py, which passes
them in (`Commands`), so that this module never imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from dlserve import registry
from dlserve.manifest import PRECISIONS
from dlserve.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent

Command: TypeAlias = Callable[[argparse.Namespace, Settings], int]
# What add_subparsers returns; argparse's own type is private and generic.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@dataclass(frozen=True)
class Commands:
    """The function each subcommand runs (its `func` default)."""

    train: Command
    export: Command
    eval: Command
    serve: Command
    bench: Command
    score: Command
    compare: Command
    rollout: Command
    rollback: Command
    versions: Command


def _column(raw: str) -> tuple[str, str]:
    role, sep, name = raw.partition("=")
    if not sep or not role or not name:
        raise argparse.ArgumentTypeError(f"expected ROLE=NAME (e.g. text=review), got {raw!r}")
    return role.strip(), name.strip()


def _names(raw: str) -> list[str]:
    return [n.strip() for n in raw.split(",") if n.strip()]


def build_parser(
    models: list[str], commands: Commands, description: str
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlserve", description=description)
    p.add_argument(
        "--data-dir",
        type=Path,
        help="data directory (default: $DLSERVE_DATA_DIR "
        "or ./data); missing data sets are downloaded there",
    )
    sub = p.add_subparsers(dest="command", required=True)
    # The order of these calls is the order of the subcommands in --help.
    _add_train(sub, models, commands.train)
    _add_export(sub, models, commands.export)
    _add_eval(sub, models, commands.eval)
    _add_serve(sub, commands.serve)
    _add_bench(sub, commands.bench)
    _add_score(sub, models, commands.score)
    _add_compare(sub, models, commands.compare)
    _add_rollout(sub, commands.rollout)
    _add_rollback(sub, commands.rollback)
    _add_versions(sub, commands.versions)
    return p


def _add_train(sub: Subparsers, models: list[str], func: Command) -> None:
    t = sub.add_parser("train", help="train a model; writes a checkpoint, metrics and a curve")
    t.add_argument("model", choices=models)
    t.add_argument("--epochs", type=int, help="number of epochs (default: the model's own)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--quick", action="store_true", help="a short run for tests and demos")
    t.set_defaults(func=func)


def _add_export(sub: Subparsers, models: list[str], func: Command) -> None:
    e = sub.add_parser("export", help="export to ONNX, check, and add to the model store")
    e.add_argument("model", choices=models)
    e.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default): export the trained model; int8 (CPUs) or fp16 "
        "(GPUs): a variant of its newest fp32 version, evaluated against it",
    )
    e.add_argument(
        "--allow-accuracy-loss",
        "--force",
        action="store_true",
        help="store a variant even when it loses more accuracy than the model's tolerance",
    )
    e.add_argument(
        "--int8-method",
        choices=registry.INT8_METHODS,
        help="with --precision int8: dynamic or static (calibrated) quantisation "
        "(default: the model's own choice, see docs/command-line.md)",
    )
    e.set_defaults(func=func)


def _add_eval(sub: Subparsers, models: list[str], func: Command) -> None:
    v = sub.add_parser("eval", help="evaluate the exported model with ONNX Runtime")
    v.add_argument("model", choices=models)
    v.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="evaluate the newest version of this precision (default: $DLSERVE_PRECISION or fp32)",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    v.set_defaults(func=func)


def _add_serve(sub: Subparsers, func: Command) -> None:
    s = sub.add_parser("serve", help="serve every model over HTTP (trains/exports what is missing)")
    s.add_argument("--port", type=int, help="HTTP port (default: $DLSERVE_PORT or 3000)")
    s.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: $DLSERVE_WORKERS or one per CPU core)",
    )
    s.add_argument("--quick", action="store_true", help="train missing models with --quick")
    s.set_defaults(func=func)


def _add_bench(sub: Subparsers, func: Command) -> None:
    b = sub.add_parser("bench", help="measure the models and write BENCHMARKS.md")
    b.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT,
        help="folder for BENCHMARKS.md and benchmarks.json (default: the project)",
    )
    # Whole seconds: wrk takes no fractions of them.
    b.add_argument(
        "--hold-s",
        type=int,
        default=60,
        help="seconds of each single-item run at 64 clients (default: 60)",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each 64-client single-item cell per server; the report "
        "takes medians (default: 3)",
    )
    b.add_argument(
        "--short-s", type=int, default=10, help="seconds of every other HTTP run (default: 10)"
    )
    b.add_argument(
        "--only",
        type=_names,
        metavar="SECTION[,SECTION]",
        help="run only these sections (inprocess, http, ...); the others keep "
        "their last results from benchmarks.json",
    )
    b.add_argument(
        "--skip",
        type=_names,
        metavar="SECTION[,SECTION]",
        help="run every section but these (e.g. --skip http: no servers, no wrk)",
    )
    b.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="also run the soak section: MINUTES of mixed traffic on every route, "
        "memory, descriptors, p99 and errors sampled every minute",
    )
    b.set_defaults(func=func)


def _add_score(sub: Subparsers, models: list[str], func: Command) -> None:
    c = sub.add_parser(
        "score",
        help="batch-score a file (Parquet, CSV, JSON Lines) with a model "
        "from the store; resumable; see docs/batch-scoring.md",
    )
    c.add_argument("model", choices=models)
    c.add_argument(
        "input",
        type=Path,
        help="file or folder to score; a payload log (DLSERVE_PAYLOAD_LOG's folder, or "
        "one of its .jsonl.gz files) replays the traffic it recorded",
    )
    c.add_argument(
        "output",
        type=Path,
        help="file to write (.parquet, .csv or .jsonl; Parquet if the name says "
        "nothing); rejected rows go beside it, to NAME.rejects.EXT",
    )
    c.add_argument(
        "--model-tag",
        help="the model version to use (default: the latest; a "
        "resumed job keeps the version it started with)",
    )
    c.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: Ray Data, locally or on a cluster",
    )
    c.add_argument(
        "--input-format",
        help="parquet, csv, tsv, jsonl or payloads (default: from the file name)",
    )
    c.add_argument(
        "--output-format",
        help="parquet, csv, tsv or jsonl (default: from the file name, else parquet)",
    )
    c.add_argument(
        "--id-column",
        help="the input's id column, copied to each output row "
        "(default: id; the recommender: user_id)",
    )
    c.add_argument(
        "--column",
        type=_column,
        action="append",
        metavar="ROLE=NAME",
        help="the input column for a role when it is named otherwise: pixels, "
        "image, text, user_id, movie_id, rating (repeatable)",
    )
    c.add_argument(
        "--k", type=int, default=10, help="recommender: recommendations per user (default: 10)"
    )
    c.add_argument(
        "--ratings",
        type=Path,
        help="recommender: the users' ratings table, "
        "to predict the INPUT's user_id, movie_id pairs from",
    )
    c.add_argument("--ratings-format", help="the format of --ratings (default: from its name)")
    c.add_argument("--batch-size", type=int, default=256, help="items per model run (default: 256)")
    c.add_argument(
        "--chunk-rows",
        type=int,
        default=10_000,
        help="rows per checkpointed chunk: a killed job re-scores at most one "
        "(default: 10,000; for the recommender's top-k, users)",
    )
    c.add_argument(
        "--max-rejects",
        type=int,
        help="stop with exit status 1 once more rows than this are rejected (default: no limit)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (and discard another job's partial work)",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    c.add_argument(
        "--ray-address", help="--engine ray: an existing cluster (default: start a local Ray)"
    )
    c.add_argument(
        "--ray-actors",
        type=int,
        help="--engine ray: model actors (default: one per CPU, or per GPU on CUDA)",
    )
    c.set_defaults(func=func)


def _add_compare(sub: Subparsers, models: list[str], func: Command) -> None:
    c = sub.add_parser(
        "compare",
        help="how often two sets of a model's answers disagree, by label and confidence: "
        "a payload log against its replay by another version; see docs/payload-logging.md",
    )
    c.add_argument("model", choices=models)
    c.add_argument(
        "baseline",
        type=Path,
        help="a payload log (folder or .jsonl.gz: the answers the service gave) or a "
        "`dlserve score` output",
    )
    c.add_argument("candidate", type=Path, help="the same, for the other version")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument(
        "--max-disagreement",
        type=float,
        metavar="PERCENT",
        help="exit with status 1 when more than this share of the answers disagree "
        "(a gate for a release pipeline)",
    )
    c.set_defaults(func=func)


def _add_url(parser: argparse.ArgumentParser) -> None:
    """--url, for the commands that talk to a running server (cli/rollout.py). Those take
    any model name, not a choice of `models`: the server knows what it serves, and may
    serve models that this machine has not registered."""
    parser.add_argument(
        "--url",
        help="the server (default: $DLSERVE_URL or http://localhost:$DLSERVE_PORT, "
        "port 3000 if unset); it needs DLSERVE_MODEL_CONTROL=true, and $DLSERVE_API_KEY "
        "is sent when set",
    )


def _add_rollout(sub: Subparsers, func: Command) -> None:
    r = sub.add_parser(
        "rollout",
        help="make a running server serve a version of a model, in every worker, "
        "without a restart; see docs/rollout.md",
    )
    r.add_argument("model")
    r.add_argument(
        "version",
        nargs="?",
        help="abc123 or MODEL:abc123 (default: the newest of the server's DLSERVE_PRECISION)",
    )
    r.add_argument(
        "--canary",
        type=float,
        metavar="PERCENT",
        help="serve the version on this share of requests only, beside the current one; "
        "rolling it out again without --canary promotes it, rollback drops it",
    )
    _add_url(r)
    r.set_defaults(func=func)


def _add_rollback(sub: Subparsers, func: Command) -> None:
    r = sub.add_parser(
        "rollback",
        help="make a running server serve the version it served before the current one "
        "(or drop its canary)",
    )
    r.add_argument("model")
    _add_url(r)
    r.set_defaults(func=func)


def _add_versions(sub: Subparsers, func: Command) -> None:
    v = sub.add_parser(
        "versions",
        help="a model's versions in a running server's store: which serves, which served "
        "before, their precision, age and metrics",
    )
    v.add_argument("model")
    v.add_argument("--json", action="store_true", help="print the server's entries as JSON")
    _add_url(v)
    v.set_defaults(func=func)
