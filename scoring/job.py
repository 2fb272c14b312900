"""A scoring job from start to end: every check that can fail before any work, then the
engine (local or Ray), for any model whose registry entry names a batch-scoring adapter.
Its input is a table, or a payload log to replay (scoring/payloads.py)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from dlserve import registry
from dlserve.registry import ModelSpec
from dlserve.settings import Settings
from scoring import local, payloads
from scoring.adapters import Job, Plan, Scorer
from scoring.checkpoint import WorkDir
from scoring.errors import ScoringError
from scoring.formats import FORMATS, detect

log = logging.getLogger("dlserve.score")
ENGINES = ("local", "ray")


def scorable(settings: Settings) -> list[str]:
    return [n for n, s in registry.available(settings.model_modules).items() if s.scoring]


def check_output(output: Path) -> None:
    """Stop now if the output cannot be written (a missing folder, no permission, a
    read-only file system): found by writing a file beside it."""
    if output.is_dir():
        raise ScoringError(f"output {output}: is a folder; name the file to write")
    folder = output.parent
    if not folder.is_dir():
        raise ScoringError(f"output {output}: the folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{output.name}.probe"):
            pass
    except OSError as exc:
        raise ScoringError(f"output {output}: cannot write in {folder} ({exc.strerror})") from None


def _version(job: Job) -> str | None:
    """--model-tag as a version: `digits:abc` or `abc`."""
    if not job.model_tag:
        return None
    name, _, version = job.model_tag.rpartition(":")
    if name and name != job.model:
        raise ScoringError(f"--model-tag {job.model_tag}: a version of {name}, not of {job.model}")
    return version


def _resumed_version(work: WorkDir, identity: dict[str, Any]) -> str | None:
    """The model version partial work of this same job was scored with: a resumed job
    keeps it, even if a newer version was exported meanwhile."""
    recorded = work.recorded() or {}
    if {k: v for k, v in recorded.items() if k != "model"} == identity and "model" in recorded:
        return str(recorded["model"]).rpartition(":")[2]
    return None


def open_job(job: Job, settings: Settings) -> tuple[ModelSpec, Plan, WorkDir, dict[str, Any]]:
    """Everything that can stop a job, checked before any work: the model declares batch
    scoring, the engine and formats are known, the output can be written, the input is
    there and has the columns the model reads."""
    spec = registry.available(settings.model_modules)[job.model]
    if spec.scoring is None:
        raise ScoringError(
            f"model {job.model!r} declares no batch scoring (its registry entry "
            f"has no `scoring` adapter); these do: {', '.join(scorable(settings))}"
        )
    if job.engine not in ENGINES:
        raise ScoringError(f"--engine {job.engine}: choose from {', '.join(ENGINES)}")
    for flag, value, known in (
        ("--input-format", job.input_format, (*FORMATS, payloads.FORMAT)),
        ("--output-format", job.output_format, FORMATS),
    ):
        if value and value not in known:
            raise ScoringError(f"{flag} {value}: choose from {', '.join(known)}")
    for flag, value in (("--batch-size", job.batch_size), ("--chunk-rows", job.chunk_rows)):
        if value < 1:
            raise ScoringError(f"{flag}: must be at least 1, got {value}")
    output_format = detect(job.output, job.output_format, default="parquet")
    check_output(job.output)
    scorer: Scorer = spec.scoring.load()
    if payloads.is_log(job.input, job.input_format):  # replaying real traffic
        plan = payloads.plan(job, settings, job.model, scorer)
    else:
        plan = scorer.plan(job, settings)
    work = WorkDir(job.output, output_format)
    identity = {
        **plan.identity(),
        "engine": job.engine,
        "output_format": output_format,
        "chunk_rows": job.chunk_rows,
        "batch_size": job.batch_size,
    }
    return spec, plan, work, identity


def run(job: Job, settings: Settings) -> local.Counts | None:
    """Run a job; None when its output is already there (a finished job)."""
    spec, plan, work, identity = open_job(job, settings)
    version = _version(job) or _resumed_version(work, identity)
    runner = spec.runner.load(f"{spec.name}:{version}" if version else spec.name, settings)
    identity = {"model": runner.tag, **identity}
    plan.check(runner)
    try:
        fresh = work.start(identity, overwrite=job.overwrite)
    except OSError as exc:
        raise ScoringError(f"output {job.output}: cannot set up {work.path} ({exc})") from None
    if not fresh:
        return None
    if work.done():
        log.info("resuming the job in %s with %s", work.path, runner.tag)
    if job.engine == "ray":
        from scoring import ray_engine

        return ray_engine.run(job, plan, runner, work, settings)
    return local.run(
        plan, runner, work, chunk_rows=job.chunk_rows, max_rejects=job.max_rejects, quiet=job.quiet
    )


def summary(counts: local.Counts, job: Job) -> str:
    work_unit = counts.unit
    rate = counts.rows / counts.seconds if counts.seconds else 0.0
    resumed = (
        f", {counts.resumed_chunks} chunk(s) from an earlier run" if counts.resumed_chunks else ""
    )
    return (
        f"scored {counts.rows:,} {work_unit}: {counts.written:,} written to {job.output}, "
        f"{counts.rejected:,} rejected (to {WorkDir(job.output, '').rejects}); "
        f"{counts.seconds:.1f} s, {rate:,.0f} {work_unit}/s{resumed}"
    )


def exists_message(job: Job) -> str:
    return (
        f"{job.output} exists: this job has finished, nothing to do (add --overwrite to "
        "score again)"
    )
