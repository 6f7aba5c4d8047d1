"""A small code location with the shape of the platform's graph, for tests of the backfill path: dynamic shard
partitions, a one-shot fault that a RetryPolicy absorbs, and a blocking check that fails for one shard.

The check fails for the shard named in ``PROBE_BAD_SHARD``; its downstream partition must never be materialized.
Every materialization appends a line to ``$PROBE_LOG`` so the test can count what ran.

``gpu_holder_job``: one op in the ``gpu`` pool whose first attempt writes its PID and waits to be killed, for the
test of what the daemon does with a crashed run's pool slot.
"""

import os
import time
from pathlib import Path

import dagster as dg

shards = dg.DynamicPartitionsDefinition(name="probe_shards")


def _record(name: str, key: str | None = None) -> None:
    with open(os.environ["PROBE_LOG"], "a") as log:
        log.write(f"{name} {key or '-'}\n")


@dg.asset(partitions_def=shards, backfill_policy=dg.BackfillPolicy.multi_run(1),
          retry_policy=dg.RetryPolicy(max_retries=2, delay=0.1),
          check_specs=[dg.AssetCheckSpec("rows_positive", asset="probe_filtered", blocking=True)])
def probe_filtered(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    key = context.partition_key
    once = Path(os.environ["PROBE_LOG"]).with_name(f"failed-once-{key}")
    if not once.exists():  # the first attempt of every shard dies of a transient error
        once.touch()
        raise OSError(f"transient storage error for {key}")
    _record("probe_filtered", key)
    passed = key != os.environ.get("PROBE_BAD_SHARD")
    return dg.MaterializeResult(check_results=[dg.AssetCheckResult(check_name="rows_positive", passed=passed)])


@dg.asset(deps=[dg.AssetDep(probe_filtered, partition_mapping=dg.IdentityPartitionMapping())],
          partitions_def=shards, backfill_policy=dg.BackfillPolicy.multi_run(1))
def probe_scored(context: dg.AssetExecutionContext) -> None:
    _record("probe_scored", context.partition_key)


@dg.asset(deps=[dg.AssetDep(probe_scored, partition_mapping=dg.AllPartitionMapping())])
def probe_summary() -> None:
    _record("probe_summary")


@dg.op(pool="gpu")
def hold_gpu_slot() -> None:
    pids = Path(os.environ["PROBE_LOG"]).with_name("holder-pids")
    first = not pids.exists()
    with open(pids, "a") as out:
        out.write(f"{os.getpid()}\n")
    if first:  # the test SIGKILLs this process while it holds the gpu slot
        time.sleep(600)
    _record("hold_gpu_slot")


@dg.job
def gpu_holder_job() -> None:
    hold_gpu_slot()


defs = dg.Definitions(assets=[probe_filtered, probe_scored, probe_summary], jobs=[gpu_holder_job],
                      executor=dg.in_process_executor)
