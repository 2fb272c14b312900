"""`dlserve`: train, export, eval and serve the models (see README for each command).

Heavy imports (torch, bentoml) happen inside the command that needs them, so that
`dlserve eval` and `dlserve serve` never load PyTorch unless they must train.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from dlserve.data.download import DataError
from dlserve.manifest import ModelIntegrityError
from dlserve.settings import KNOWN_MODELS, Settings, SettingsError, settings_from_env

log = logging.getLogger("dlserve")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _data_source(settings: Settings, model: str) -> tuple[Path, str | None]:
    """Where a model's data set is read from, and the URL that fills in missing files."""
    if model == "recommender":
        folder = settings.data_dir / settings.movielens
        # Only MovieLens 100K is downloaded; a newer release is a folder the user provides.
        return folder, settings.movielens_url if folder.name == "ml-100k" else None
    return settings.data_dir, {"digits": settings.mnist_url,
                               "sentiment": settings.sst2_url}[model]


def train_model(name: str, settings: Settings, *, epochs: int | None = None, seed: int = 0,
                quick: bool = False) -> dict:
    from training import digits, recommender, sentiment

    trainers = {"digits": digits.train, "sentiment": sentiment.train,
                "recommender": recommender.train}
    data_dir, url = _data_source(settings, name)
    return trainers[name](data_dir, settings.artifacts_dir, epochs=epochs, seed=seed,
                          quick=quick, download_url=url)


def export_model(name: str, settings: Settings) -> str:
    from export import digits, recommender, sentiment

    exporters = {"digits": digits.export, "sentiment": sentiment.export,
                 "recommender": recommender.export}
    stored = exporters[name](settings.artifacts_dir)
    log.info("exported %s (sha256 %s) to %s", stored.tag, stored.manifest.onnx_sha256,
             stored.path)
    return stored.tag


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    metrics = train_model(args.model, settings, epochs=args.epochs, seed=args.seed,
                          quick=args.quick)
    print(json.dumps(metrics))
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    print(export_model(args.model, settings))
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from dlserve.models import load_runner

    runner = load_runner(args.model, settings)
    data_dir, url = _data_source(settings, args.model)
    metrics = runner.evaluate(data_dir, download_url=url)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>20}: {value}")
    return 0


def ensure_models(settings: Settings, *, quick: bool = False) -> None:
    """Train and export every configured model that the model store does not hold yet."""
    from dlserve import store
    from training.common import run_paths

    for name in settings.models:
        if store.exists(name):
            continue
        if not run_paths(settings.artifacts_dir, name).checkpoint.is_file():
            log.warning("model %r is not trained yet: training it now%s",
                        name, " (--quick)" if quick else "")
            train_model(name, settings, quick=quick)
        log.warning("model %r is not in the model store yet: exporting it now", name)
        export_model(name, settings)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    ensure_models(settings, quick=args.quick)
    command = [sys.executable, "-m", "bentoml", "serve", "service.app:DLServe",
               "--working-dir", str(PROJECT_ROOT), "--port", str(settings.port)]
    log.info("starting: %s", " ".join(command))
    env = {**os.environ, "DLSERVE_MODELS": ",".join(settings.models),
           "DLSERVE_PORT": str(settings.port), "DLSERVE_WORKERS": str(settings.workers)}
    return subprocess.call(command, env=env)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from dlserve.bench import inprocess, report, workloads
    from dlserve.models import load_runner

    if args.rounds < 1:
        raise ValueError(f"--rounds: must be at least 1, got {args.rounds}")
    results: dict = {"machine": report.machine(), "ceiling": []}
    for name in settings.models:
        runner = load_runner(name, settings)
        log.info("bench: %s in-process ceiling", name)
        if name == "sentiment":
            short, long = workloads.sentiment_texts(runner, settings.data_dir)
            results["ceiling"].append(inprocess.ceiling(runner, workloads.cycle(short)))
            log.info("bench: sentiment length bucketing")
            results["bucketing"] = inprocess.bucketing(runner, short, long)
        elif name == "recommender":
            queries = workloads.recommender_queries(runner, _data_source(settings, name)[0])
            results["ceiling"].append(inprocess.ceiling(runner, workloads.cycle(queries)))
        else:
            parts = workloads.digits_part(settings.data_dir)
            results["ceiling"].append(inprocess.ceiling(runner, parts))
    if not args.no_http:
        from dlserve.bench import compare

        results["http"] = compare.run(
            list(settings.models), settings.data_dir, _data_source(settings, "recommender")[0],
            workers=settings.workers, hold_s=args.hold_s, short_s=args.short_s,
            rounds=args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "BENCHMARKS.md").write_text(report.render(results))
    print(args.out / "BENCHMARKS.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlserve", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, help="data directory (default: $DLSERVE_DATA_DIR "
                   "or ./data); missing data sets are downloaded there")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; writes a checkpoint, metrics and a curve")
    t.add_argument("model", choices=KNOWN_MODELS)
    t.add_argument("--epochs", type=int, help="number of epochs (default: the model's own)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--quick", action="store_true", help="a short run for tests and demos")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export to ONNX, check, and add to the model store")
    e.add_argument("model", choices=KNOWN_MODELS)
    e.add_argument("--precision", choices=["fp32"], default="fp32",
                   help="weights precision (default: fp32)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="evaluate the exported model with ONNX Runtime")
    v.add_argument("model", choices=KNOWN_MODELS)
    v.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    v.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="serve every model over HTTP (trains/exports what is missing)")
    s.add_argument("--port", type=int, help="HTTP port (default: $DLSERVE_PORT or 3000)")
    s.add_argument("--workers", type=int,
                   help="worker processes (default: $DLSERVE_WORKERS or one per CPU core)")
    s.add_argument("--quick", action="store_true", help="train missing models with --quick")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="measure the models and write BENCHMARKS.md")
    b.add_argument("--out", type=Path, default=PROJECT_ROOT,
                   help="folder for BENCHMARKS.md and benchmarks.json (default: the project)")
    b.add_argument("--hold-s", type=float, default=60.0,
                   help="seconds of each single-item run at 64 clients (default: 60)")
    b.add_argument("--rounds", type=int, default=3,
                   help="runs of each 64-client single-item cell per server; the report "
                        "takes medians (default: 3)")
    b.add_argument("--short-s", type=float, default=10.0,
                   help="seconds of every other HTTP run (default: 10)")
    b.add_argument("--no-http", action="store_true",
                   help="only the in-process measurements (no servers, no wrk)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_env(
            data_dir=args.data_dir, port=getattr(args, "port", None),
            workers=getattr(args, "workers", None))
        return args.func(args, settings)
    except (DataError, ModelIntegrityError, SettingsError, FileNotFoundError, ValueError) as exc:
        print(f"dlserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
