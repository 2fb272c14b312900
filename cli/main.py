"""`dlserve`: train, export, eval, serve, bench and batch-score the models (see README and docs/).

Every command works on any model in the registry (`dlserve.registry`), by name. Heavy
imports (torch, bentoml, the data readers) happen inside the command that needs them, so
that `dlserve eval` and `dlserve serve` never load PyTorch unless they must train.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlserve import registry
from dlserve.manifest import PRECISIONS, ModelIntegrityError
from dlserve.registry import ModelSpec
from dlserve.settings import Settings, SettingsError, load_settings
from readers.download import DataError

if TYPE_CHECKING:
    from cli.serve import StopSignals

log = logging.getLogger("dlserve")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def spec_of(name: str, settings: Settings) -> ModelSpec:
    return registry.available(settings.model_modules)[name]


def train_model(
    name: str, settings: Settings, *, epochs: int | None = None, seed: int = 0, quick: bool = False
) -> dict[str, Any]:
    spec = spec_of(name, settings)
    source = spec.data(settings)
    return spec.train.load()(
        source.folder,
        settings.artifacts_dir,
        epochs=epochs,
        seed=seed,
        quick=quick,
        download_url=source.url,
    )


def export_model(
    name: str,
    settings: Settings,
    *,
    precision: str = "fp32",
    allow_accuracy_loss: bool = False,
    int8_method: str | None = None,
) -> str:
    """Export the trained model (fp32), or make a variant of its newest fp32 version."""
    spec = spec_of(name, settings)
    if int8_method is not None and precision != "int8":
        raise ValueError(f"--int8-method {int8_method}: goes with --precision int8")
    if precision == "fp32":
        stored = spec.export.load()(settings.artifacts_dir, precision=precision)
    else:
        from export.precision import export_variant

        stored = export_variant(
            spec,
            settings,
            precision,
            allow_accuracy_loss=allow_accuracy_loss,
            int8_method=int8_method,
        )
    log.info("exported %s (sha256 %s) to %s", stored.tag, stored.manifest.onnx_sha256, stored.path)
    return str(stored.tag)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    metrics = train_model(
        args.model, settings, epochs=args.epochs, seed=args.seed, quick=args.quick
    )
    print(json.dumps(metrics))
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    print(
        export_model(
            args.model,
            settings,
            precision=args.precision,
            allow_accuracy_loss=args.allow_accuracy_loss,
            int8_method=args.int8_method,
        )
    )
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    spec = spec_of(args.model, settings)
    if args.precision is not None:
        settings = settings.model_copy(update={"precision": args.precision})
    metrics = spec.evaluate.load()(spec.load_runner(settings), spec.data(settings))
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>20}: {value}")
    return 0


# training/common.py's RunPaths.checkpoint; named here because that module imports torch.
CHECKPOINT_FILE = "checkpoint.pt"


def run_cli(settings: Settings, signals: StopSignals, *args: str) -> None:
    """Run `dlserve ARGS` (train, export) in a child process, so that PyTorch's memory goes
    when the child exits instead of staying with `dlserve serve` while it serves."""
    from cli import serve

    command = [sys.executable, "-m", "cli.main", "--data-dir", str(settings.data_dir), *args]
    status = serve.supervise(command, signals, relay=serve.relay_to_task, stop_s=serve.TASK_STOP_S)
    if signals.received:
        raise serve.Stopped(signals.received[0])
    if status != 0:
        raise serve.ServeError(
            f"`dlserve {' '.join(args)}` failed (exit status {status}); its messages are above"
        )


def ensure_models(settings: Settings, signals: StopSignals, *, quick: bool = False) -> None:
    """Train and export every configured model that the model store does not hold yet, each
    step in a child process (run_cli)."""
    from dlserve import store

    for name in settings.models:
        if store.exists(name):
            continue
        if not (settings.artifacts_dir / name / CHECKPOINT_FILE).is_file():
            log.warning(
                "model %r is not trained yet: training it now%s",
                name,
                " (--quick)" if quick else "",
            )
            run_cli(settings, signals, "train", name, *(["--quick"] if quick else []))
        log.warning("model %r is not in the model store yet: exporting it now", name)
        run_cli(settings, signals, "export", name)


def server_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """`bentoml serve` of the service, and its environment."""
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service.app:DLServe",
        "--working-dir",
        str(PROJECT_ROOT),
        "--port",
        str(settings.port),
    ]
    env = {
        **os.environ,
        "DLSERVE_MODELS": ",".join(settings.models),
        "DLSERVE_PORT": str(settings.port),
        "DLSERVE_WORKERS": str(settings.workers),
    }
    return command, env


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Supervise the server (cli/serve.py): a taken port or a failed training or export is
    one line and exit status 2; SIGTERM drains the server, SIGINT stops it at once, and
    nothing it started outlives it."""
    from cli import serve

    with serve.supervisor() as signals:
        try:
            serve.check_port_free(settings.port)  # before training, which can take minutes
            ensure_models(settings, signals, quick=args.quick)
            serve.check_port_free(settings.port)
            command, env = server_command(settings)
            log.info("starting: %s", " ".join(command))
            if settings.docs:
                log.info(
                    "once it is up: API docs on http://localhost:%d/, a demo page on "
                    "http://localhost:%d/demo",
                    settings.port,
                    settings.port,
                )
            return serve.supervise(
                command,
                signals,
                relay=serve.relay_to_server,
                env=env,
                stop_s=settings.drain_timeout_s + serve.STOP_MARGIN_S,
            )
        except serve.Stopped as stop:
            log.warning("%s: stopped before the server started", stop)
            return 128 + stop.signum
        except serve.ServeError as exc:
            print(f"dlserve: error: {exc}", file=sys.stderr)
            return 2


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from bench.main import run_bench

    for option, value in (
        ("--rounds", args.rounds),
        ("--hold-s", args.hold_s),
        ("--short-s", args.short_s),
    ):
        if value < 1:
            raise ValueError(f"{option}: must be at least 1, got {value}")
    print(
        run_bench(
            settings,
            out=args.out,
            only=args.only,
            skip=args.skip,
            hold_s=args.hold_s,
            short_s=args.short_s,
            rounds=args.rounds,
            soak_minutes=args.soak,
        )
    )
    return 0


def cmd_score(args: argparse.Namespace, settings: Settings) -> int:
    from scoring import job as scoring
    from scoring.adapters import Job
    from scoring.errors import ScoringError
    from scoring.local import TooManyRejects

    job = Job(
        model=args.model,
        input=args.input,
        output=args.output,
        model_tag=args.model_tag,
        engine=args.engine,
        input_format=args.input_format,
        output_format=args.output_format,
        id_column=args.id_column,
        columns=dict(args.column or []),
        k=args.k,
        ratings=args.ratings,
        ratings_format=args.ratings_format,
        batch_size=args.batch_size,
        chunk_rows=args.chunk_rows,
        max_rejects=args.max_rejects,
        overwrite=args.overwrite,
        quiet=args.quiet,
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
    )
    try:
        counts = scoring.run(job, settings)
    except TooManyRejects as exc:
        print(f"dlserve: {exc}", file=sys.stderr)
        return 1
    except ScoringError as exc:
        print(f"dlserve: error: {exc}", file=sys.stderr)
        return 2
    if counts is None:
        print(scoring.exists_message(job), file=sys.stderr)
    elif not args.quiet:
        print(scoring.summary(counts, job))
    return 0


def _column(raw: str) -> tuple[str, str]:
    role, sep, name = raw.partition("=")
    if not sep or not role or not name:
        raise argparse.ArgumentTypeError(f"expected ROLE=NAME (e.g. text=review), got {raw!r}")
    return role.strip(), name.strip()


def _names(raw: str) -> list[str]:
    return [n.strip() for n in raw.split(",") if n.strip()]


def build_parser(models: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlserve", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir",
        type=Path,
        help="data directory (default: $DLSERVE_DATA_DIR "
        "or ./data); missing data sets are downloaded there",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; writes a checkpoint, metrics and a curve")
    t.add_argument("model", choices=models)
    t.add_argument("--epochs", type=int, help="number of epochs (default: the model's own)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--quick", action="store_true", help="a short run for tests and demos")
    t.set_defaults(func=cmd_train)

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
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="evaluate the exported model with ONNX Runtime")
    v.add_argument("model", choices=models)
    v.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="evaluate the newest version of this precision (default: $DLSERVE_PRECISION or fp32)",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    v.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="serve every model over HTTP (trains/exports what is missing)")
    s.add_argument("--port", type=int, help="HTTP port (default: $DLSERVE_PORT or 3000)")
    s.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: $DLSERVE_WORKERS or one per CPU core)",
    )
    s.add_argument("--quick", action="store_true", help="train missing models with --quick")
    s.set_defaults(func=cmd_serve)

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
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser(
        "score",
        help="batch-score a file (Parquet, CSV, JSON Lines) with a model "
        "from the store; resumable; see docs/batch-scoring.md",
    )
    c.add_argument("model", choices=models)
    c.add_argument("input", type=Path, help="file or folder to score")
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
        "--input-format", help="parquet, csv, tsv or jsonl (default: from the file name)"
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
    c.set_defaults(func=cmd_score)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request it sends at INFO: thousands of lines in a bench's bursts.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        models = list(registry.available(load_settings().model_modules))
        args = build_parser(models).parse_args(argv)
        settings = load_settings(
            data_dir=args.data_dir,
            port=getattr(args, "port", None),
            workers=getattr(args, "workers", None),
        )
        return args.func(args, settings)
    except (DataError, ModelIntegrityError, SettingsError, FileNotFoundError, ValueError) as exc:
        print(f"dlserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
