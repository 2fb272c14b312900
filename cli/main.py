"""`dlserve`: train, export, eval, serve, bench, batch-score and roll out the models (see docs/).

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
from typing import TYPE_CHECKING, Any

from cli import background
from cli.parser import PROJECT_ROOT, Commands, build_parser
from cli.rollout import cmd_rollback, cmd_rollout, cmd_versions
from dlserve import allocator, registry
from dlserve.manifest import ModelIntegrityError
from dlserve.registry import ModelSpec
from dlserve.settings import Settings, SettingsError, load_settings
from readers.download import DataError

if TYPE_CHECKING:
    from cli.serve import StopSignals

log = logging.getLogger("dlserve")


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


def prepare_model(name: str, settings: Settings, signals: StopSignals, *, quick: bool) -> None:
    """Train (unless its checkpoint is there) and export a model the store does not hold,
    each step in a child process (run_cli)."""
    if not (settings.artifacts_dir / name / CHECKPOINT_FILE).is_file():
        log.warning(
            "model %r is not trained yet: training it now%s", name, " (--quick)" if quick else ""
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
        # jemalloc, where installed: set for the server's processes from their start
        **allocator.server_env(settings.allocator, dict(os.environ)),
    }
    return command, env


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Supervise the server (cli/serve.py): a taken port or a failed training or export is
    one line and exit status 2; SIGTERM drains the server, SIGINT stops it at once, and
    nothing it started outlives it."""
    from cli import serve

    with serve.supervisor() as signals:
        try:
            serve.check_ports_free(settings)  # before training, which can take minutes
            missing = background.missing_models(settings)
            # With nothing to serve yet, the quickest model first; the rest beside the server.
            first = missing[:1] if len(missing) == len(settings.models) else []
            later = missing[len(first) :]
            for name in first:
                prepare_model(name, settings, signals, quick=args.quick)
            serve.check_ports_free(settings)
            command, env = server_command(settings)
            if later:
                env["DLSERVE_STILL_TRAINING"] = ",".join(later)
                log.warning(
                    "serving now; training %s meanwhile: until each is exported, its "
                    "requests get 503 saying how long it should take",
                    ", ".join(later),
                )
            log.info("starting: %s", " ".join(command))
            if settings.docs:
                log.info(
                    "once it is up: API docs on http://localhost:%d/, a demo page on "
                    "http://localhost:%d/demo",
                    settings.port,
                    settings.port,
                )
            trainer = background.Trainer(
                later,
                lambda name: prepare_model(name, settings, signals, quick=args.quick),
                background.stopper(signals.received),
            )
            trainer.start()
            status = serve.supervise(
                command,
                signals,
                relay=serve.relay_to_server,
                env=env,
                stop_s=settings.drain_timeout_s + serve.STOP_MARGIN_S,
            )
            trainer.join(timeout=serve.TASK_STOP_S + serve.STOP_MARGIN_S)
            if trainer.failure is not None:
                raise serve.ServeError(str(trainer.failure))
            return status
        except serve.Stopped as stop:
            log.warning("%s: stopped before the server started", stop)
            return 128 + stop.signum
        except (serve.ServeError, allocator.AllocatorError) as exc:
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


def cmd_compare(args: argparse.Namespace, settings: Settings) -> int:
    from scoring import compare, payloads
    from scoring.errors import ScoringError

    spec = spec_of(args.model, settings)
    try:
        replay = payloads.replay_of(args.model, spec.scoring.load() if spec.scoring else None)
        result = compare.compare(args.model, args.baseline, args.candidate, replay)
    except ScoringError as exc:
        print(f"dlserve: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()) if args.json else result.text())
    if args.max_disagreement is not None and result.rate * 100 > args.max_disagreement:
        print(
            f"dlserve: {result.rate:.2%} of the answers disagree, more than "
            f"--max-disagreement {args.max_disagreement:g} %",
            file=sys.stderr,
        )
        return 1
    return 0


# The function each subcommand runs; cli/parser.py declares their arguments.
COMMANDS = Commands(
    train=cmd_train,
    export=cmd_export,
    eval=cmd_eval,
    serve=cmd_serve,
    bench=cmd_bench,
    score=cmd_score,
    compare=cmd_compare,
    rollout=cmd_rollout,
    rollback=cmd_rollback,
    versions=cmd_versions,
)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request it sends at INFO: thousands of lines in a bench's bursts.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        models = list(registry.available(load_settings().model_modules))
        parser = build_parser(models, COMMANDS, description=__doc__.splitlines()[0])
        args = parser.parse_args(argv)
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
