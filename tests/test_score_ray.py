"""`dlserve score --engine ray` on a local Ray: Ray Data reads the file, a pool of actors
runs the model, and the output is exactly the local engine's."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import dlserve
from tests.test_score import digits_table

pytest.importorskip(
    "ray.data",
    reason="Ray Data is not installed and `make ray-tools` could "
    "not install it (pip install 'dlserve[ray]')",
)


def test_ray_engine_on_local_ray_writes_the_local_engines_output(
    digits_model: str, data_dir: Path, tmp_path: Path
) -> None:
    table = digits_table(data_dir, 600)
    # A row with no id and one of the wrong size: refused alike by both engines.
    bad = pa.table(
        {
            "id": pa.array([None, 600], pa.int64()),
            "pixels": pa.array([[0] * 784, [0] * 783], pa.list_(pa.uint8())),
        }
    )
    table = pa.concat_tables([table.cast(bad.schema), bad])
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=150)
    args = ["digits", str(tmp_path / "in.parquet")]
    dlserve("score", *args, str(tmp_path / "local.parquet"), "--chunk-rows", "150")
    result = dlserve(
        "score",
        *args,
        str(tmp_path / "ray.parquet"),
        "--engine",
        "ray",
        "--ray-actors",
        "2",
        "--chunk-rows",
        "150",
    )
    assert "600 written" in result.stdout and "2 rejected" in result.stdout, result.stdout
    assert pq.read_table(tmp_path / "ray.parquet").equals(pq.read_table(tmp_path / "local.parquet"))
    local = pq.read_table(tmp_path / "local.rejects.parquet").to_pylist()
    ray = pq.read_table(tmp_path / "ray.rejects.parquet").to_pylist()
    # Ray's reader does not number rows, so its rejects carry the id and reason only.
    assert [(r["id"], r["reason"]) for r in ray] == [(r["id"], r["reason"]) for r in local]
    assert not list(tmp_path.glob("*.partial"))
