"""The Ray Data engine: `dlserve score ... --engine ray`, on a local Ray or a cluster.

Ray Data reads the input (`read_parquet`, `read_csv`, `read_json`), `map_batches` sends
the batches to a pool of actors (`ActorPoolStrategy(size=n)`), each holding one ONNX
Runtime session and running the model's adapter on its batches exactly as the local engine
does (`local.score_chunk`), and the driver writes the results in input order
(`preserve_order`) through the same partial-work folder and final rename as the local
engine, so the output is the local engine's, and appears only complete.

What a re-run does: Ray's batches are not stable chunks of the input, so a Ray job killed
midway starts again from the beginning (its partial parts are discarded); a finished job
is not re-run. Actors ask for a GPU only when the model runs on CUDA (or TensorRT) here;
if the cluster has no GPU the job stops with a message instead of waiting for one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from dlserve.providers import CPU
from dlserve.settings import PREFIX, Settings
from scoring.adapters import Job, Plan
from scoring.checkpoint import WorkDir
from scoring.errors import ScoringError
from scoring.formats import ROW, TableInput
from scoring.local import Counts, TooManyRejects, score_chunk

log = logging.getLogger("dlserve.score")
REJECT_ROW, REJECT_REASON = "__reject_row", "__reject_reason"


def combined_schema(plan: Plan) -> pa.Schema:
    """Output rows and rejected rows in one table, so that one map_batches carries both."""
    return (
        plan.output_schema()
        .append(pa.field(REJECT_ROW, pa.int64()))
        .append(pa.field(REJECT_REASON, pa.string()))
    )


def combine(plan: Plan, rows: pa.Table, rejects: pa.Table) -> pa.Table:
    schema = combined_schema(plan)
    renamed = rejects.rename_columns([plan.id_column, REJECT_ROW, REJECT_REASON])
    return pa.concat_tables(
        [
            pa.table(
                {
                    f.name: rows.column(f.name)
                    if f.name in rows.column_names
                    else pa.nulls(len(rows), f.type)
                    for f in schema
                },
                schema=schema,
            ),
            pa.table(
                {
                    f.name: renamed.column(f.name)
                    if f.name in renamed.column_names
                    else pa.nulls(len(renamed), f.type)
                    for f in schema
                },
                schema=schema,
            ),
        ]
    )


def split(plan: Plan, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    rejected = pc.is_valid(batch.column(REJECT_REASON))
    rows = batch.filter(pc.invert(rejected)).select(plan.output_schema().names)
    rejects = batch.filter(rejected).select([plan.id_column, REJECT_ROW, REJECT_REASON])
    return rows, rejects.rename_columns(plan.rejects_schema().names)


class ScoreBatches:
    """One actor of the pool: the model's runner, loaded once, scoring batch after batch."""

    def __init__(self, plan: Plan, tag: str, settings: Settings, row_column: str | None) -> None:
        from dlserve import registry

        spec = registry.available(settings.model_modules)[tag.partition(":")[0]]
        self.runner = spec.runner.load(tag, settings)
        self.plan, self.row_column = plan, row_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.row_column:
            batch = batch.rename_columns(
                [ROW if c == self.row_column else c for c in batch.column_names]
            )
        else:
            batch = batch.append_column(ROW, pa.nulls(len(batch), pa.int64()))
        return combine(self.plan, *score_chunk(self.plan, self.runner, batch))


def _read(table: TableInput, columns: list[str], blocks: int) -> Any:
    """The input as a Ray Dataset of at least `blocks` blocks where the files allow (a
    Parquet file splits at its row groups), so that every actor gets work."""
    import ray.data

    path = str(table.path)
    if table.format == "parquet":
        return ray.data.read_parquet(path, columns=columns, override_num_blocks=blocks)
    if table.format == "jsonl":
        return ray.data.read_json(path, lines=True, override_num_blocks=blocks).select_columns(
            columns
        )
    return ray.data.read_csv(path, override_num_blocks=blocks, **table.csv_options).select_columns(
        columns
    )


def _start(job: Job, actors: int) -> bool:
    """Connect to the cluster (--ray-address) or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    # The actors open the same model store and settings as this process.
    # The actors score with this process's settings (limits, providers, threads); on a
    # local Ray they also open its model store, while a cluster's nodes have their own.
    settings_env = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    env = {**settings_env, **{k: v for k, v in os.environ.items() if k.startswith("BENTOML_")}}
    # Inside a Ray job (a KubeRay RayJob's entrypoint) RAY_ADDRESS names the cluster.
    address = job.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": settings_env}, log_to_driver=False)
            return False
        # One logical CPU per actor plus one for Ray Data's read and write tasks.
        ray.init(
            num_cpus=actors + 1,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; all mean "no cluster"
        where = address or "a local Ray"
        raise ScoringError(f"--engine ray: cannot start or reach {where} ({exc})") from None
    return True


def run(job: Job, plan: Plan, runner: Any, work: WorkDir, settings: Settings) -> Counts:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ScoringError("--engine ray needs Ray Data: pip install 'dlserve[ray]'") from None
    started = time.perf_counter()
    for stale in work.path.glob("*-[0-9]*.parquet"):  # an interrupted Ray run's parts
        stale.unlink()
    gpu = runner.provider != CPU
    actors = job.ray_actors or len(os.sched_getaffinity(0))
    we_started = _start(job, actors)
    try:
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise ScoringError(
                f"{runner.tag} runs on {runner.provider} here, so its Ray actors "
                "ask for a GPU, and this Ray cluster has none; use a cluster "
                "with GPU nodes, or DLSERVE_PROVIDERS=cpu"
            )
        plan.prepare(runner, work.path)
        table, columns, row_column = plan.ray_source()
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # ours is the one progress bar
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        log.info("ray: %d actor(s), %s", actors, "one GPU each" if gpu else "CPU")
        # One Parquet file is read as one block; blocks of a chunk's rows spread the work.
        blocks = _read(table, columns, 4 * actors).repartition(
            target_num_rows_per_block=job.chunk_rows
        )
        scored = blocks.map_batches(
            ScoreBatches,
            fn_constructor_args=(plan, runner.tag, settings, row_column),
            batch_format="pyarrow",
            batch_size=job.chunk_rows,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            **({"num_gpus": 1} if gpu else {}),
        )
        rows = written = 0
        rejected = work.prepare_rejects()
        with tqdm(
            total=plan.rows,
            unit=f" {plan.unit}",
            unit_scale=True,
            dynamic_ncols=True,
            disable=True if job.quiet else None,
            desc=runner.tag,
        ) as bar:
            for index, batch in enumerate(
                scored.iter_batches(batch_format="pyarrow", batch_size=None)
            ):
                part, rejects = split(plan, batch)
                work.commit(index, part, rejects)
                rows, written, rejected = (
                    rows + len(batch),
                    written + len(part),
                    rejected + len(rejects),
                )
                bar.update(len(batch))
                if job.max_rejects is not None and rejected > job.max_rejects:
                    raise TooManyRejects(
                        f"stopped: {rejected} rejected rows is more than --max-rejects "
                        f"{job.max_rejects}; the reasons are in {work.path}/rejects-*.parquet"
                    )
    finally:
        if we_started:
            ray.shutdown()
    work.assemble(plan.output_schema(), plan.rejects_schema())
    return Counts(rows, written, rejected, time.perf_counter() - started, 0, plan.unit)
