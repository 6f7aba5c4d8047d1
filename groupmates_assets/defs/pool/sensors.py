"""Shard discovery and backfills: new files in the pool directory become partitions and get filtered; a nightly
schedule fills in whatever per-shard stage is still missing for a shard."""


import dagster as dg

from groupmates_assets.defs.jobs import filter_pool_job
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import shards as shard_io

MAX_RUNS_PER_TICK = 200  # filter runs requested per tick
MAX_NEW_SHARDS_PER_TICK = 1000  # partitions added per tick; the cursor carries on from the last one


def discover_new_shard_keys(instance: dg.DagsterInstance, platform: PlatformResource) -> tuple[list[str], list[str]]:
    """Keys of shard files not yet registered as partitions (sorted), and problems with files that were skipped."""
    fs, root = platform.pool_location()
    shards, problems = shard_io.discover_shards(fs, root)
    known = set(instance.get_dynamic_partitions(pool_shards.name))
    return [s.key for s in shards if s.key not in known], problems


def next_batch(new_keys: list[str], cursor: str | None, cap: int) -> list[str]:
    """Up to ``cap`` new keys after the cursor (in key order); once the end is reached, from the start again, so
    keys that appear behind the cursor are picked up on a later tick."""
    after = [k for k in new_keys if cursor is None or k > cursor]
    return (after or new_keys)[:cap]


@dg.sensor(
    job=filter_pool_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the pool directory (a folder or s3://...), adds a partition for up to 1,000 new shard files "
    "per tick (a cursor carries on from the last key added) and requests a filter run for up to 200 shards not yet "
    "filtered by the current quality classifier.",
)
def pool_shard_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult:
    new_keys, problems = discover_new_shard_keys(context.instance, platform)
    for problem in problems:
        context.log.warning(problem)
    batch = next_batch(new_keys, context.cursor, MAX_NEW_SHARDS_PER_TICK)
    cursor = batch[-1] if batch else context.cursor
    requests = [pool_shards.build_add_request(batch)] if batch else []
    if len(batch) < len(new_keys):
        context.log.info(f"{len(new_keys):,} new shards; adding {len(batch):,} this tick, up to {batch[-1]}")
    classifier = context.instance.get_latest_materialization_event(dg.AssetKey("quality_classifier"))
    if classifier is None:
        return dg.SensorResult(
            dynamic_partitions_requests=requests, cursor=cursor,
            skip_reason=f"registered {len(batch)} new shards; waiting for quality_classifier before filtering",
        )
    done = context.instance.get_materialized_partitions(dg.AssetKey("filtered_pool_shard"))
    registered = set(context.instance.get_dynamic_partitions(pool_shards.name)) | set(batch)
    pending = sorted(registered - done)[:MAX_RUNS_PER_TICK]
    version = classifier.run_id[:8]  # a new classifier run makes every shard eligible again
    runs = [dg.RunRequest(partition_key=key, run_key=f"{key}@classifier-{version}") for key in pending]
    return dg.SensorResult(
        run_requests=runs, dynamic_partitions_requests=requests, cursor=cursor,
        skip_reason=None if runs or requests else "no new or unfiltered shards",
    )


# Per-shard stages: (assets one run materializes, the per-shard stage it needs first, the global assets it needs).
PER_SHARD_STAGES: tuple[tuple[tuple[str, ...], str | None, tuple[str, ...]], ...] = (
    (("pool_shard", "filtered_pool_shard"), None, ("quality_classifier",)),
    (("tokenized_pool_shard",), "filtered_pool_shard", ()),
    (("pool_predictions",), "filtered_pool_shard", ("influence_model_final", "individual_influence_model")),
    (("cluster_assignments",), "pool_predictions", ("cluster_centroids",)),
)
MAX_BACKFILL_RUNS = 500  # per schedule tick


def missing_shard_runs(instance: dg.DagsterInstance, limit: int = MAX_BACKFILL_RUNS) -> list[dg.RunRequest]:
    """One run per registered shard and per-shard stage that is missing while its inputs exist (the shard's
    earlier stage and the stage's global inputs: classifier, models, centroids)."""
    shards = sorted(instance.get_dynamic_partitions(pool_shards.name))
    materialized = {assets[-1]: instance.get_materialized_partitions(dg.AssetKey(assets[-1]))
                    for assets, _, _ in PER_SHARD_STAGES}
    requests: list[dg.RunRequest] = []
    for assets, after, needs in PER_SHARD_STAGES:
        if not all(instance.get_latest_materialization_event(dg.AssetKey(need)) for need in needs):
            continue
        ready = set(shards) if after is None else materialized[after]
        requests += [dg.RunRequest(asset_selection=[dg.AssetKey(a) for a in assets], partition_key=key,
                                   tags={"groupmates/backfill": assets[-1]})
                     for key in shards if key in ready and key not in materialized[assets[-1]]]
    return requests[:limit]


@dg.schedule(
    cron_schedule="0 2 * * *",
    target=sorted({asset for assets, _, _ in PER_SHARD_STAGES for asset in assets}),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly: for every registered shard, a run of each per-shard stage it is missing (filter, tokenize, "
    "predictions, cluster assignments) whose inputs exist; at most 500 runs a night. GPU stages queue on the gpu "
    "pool.",
)
def missing_shards_backfill(context: dg.ScheduleEvaluationContext) -> dg.SkipReason | list[dg.RunRequest]:
    requests = missing_shard_runs(context.instance)
    return requests or dg.SkipReason("every registered shard has every per-shard stage whose inputs exist")
