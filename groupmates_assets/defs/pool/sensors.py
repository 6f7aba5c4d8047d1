"""Shard discovery: new files in the pool directory become partitions and get filtered."""


import dagster as dg

from groupmates_assets.defs.jobs import filter_pool_job
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import shards as shard_io

MAX_RUNS_PER_TICK = 200


def discover_new_shard_keys(instance: dg.DagsterInstance, platform: PlatformResource) -> tuple[list[str], list[str]]:
    """Keys of shard files not yet registered as partitions, and problems with files that were skipped."""
    fs, root = platform.pool_location()
    shards, problems = shard_io.discover_shards(fs, root)
    known = set(instance.get_dynamic_partitions(pool_shards.name))
    return [s.key for s in shards if s.key not in known], problems


@dg.sensor(
    job=filter_pool_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for every new shard file under the pool directory and requests a filter run "
    "for every shard not yet filtered by the current quality classifier (at most 200 runs per tick).",
)
def pool_shard_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult:
    new_keys, problems = discover_new_shard_keys(context.instance, platform)
    for problem in problems:
        context.log.warning(problem)
    requests = [pool_shards.build_add_request(new_keys)] if new_keys else []
    classifier = context.instance.get_latest_materialization_event(dg.AssetKey("quality_classifier"))
    if classifier is None:
        return dg.SensorResult(
            dynamic_partitions_requests=requests,
            skip_reason=f"registered {len(new_keys)} new shards; waiting for quality_classifier before filtering",
        )
    done = context.instance.get_materialized_partitions(dg.AssetKey("filtered_pool_shard"))
    registered = set(context.instance.get_dynamic_partitions(pool_shards.name)) | set(new_keys)
    pending = sorted(registered - done)[:MAX_RUNS_PER_TICK]
    version = classifier.run_id[:8]  # a new classifier run makes every shard eligible again
    runs = [dg.RunRequest(partition_key=key, run_key=f"{key}@classifier-{version}") for key in pending]
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=requests,
        skip_reason=None if runs or requests else "no new or unfiltered shards",
    )
