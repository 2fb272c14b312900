"""Batch scoring: `dlserve score MODEL INPUT OUTPUT` over Parquet, CSV and JSON Lines files.

The generic engine lives here: reading the input in chunks (`formats`), the job and its
fail-fast checks (`job`), the partial work that makes a job resumable (`checkpoint`), the
local engine (`local`) and the Ray Data engine (`ray_engine`). What a model reads and
writes is its adapter (`adapters` and `scoring/<model>.py`), named by the `scoring` field
of its registry entry; adapters call the same checks, runner and answer formatting as the
model's HTTP routes, so a file scored here gets the answers the service gives.

Not part of the serving core: the service and the Bento never import this package or
pyarrow.
"""
