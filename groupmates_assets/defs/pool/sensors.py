"""Shard discovery and backfills: the pool directory's files become partitions (and a vanished file's partition
is deleted), shards not yet filtered by the current classifier get filter runs; a nightly schedule fills in
whatever per-shard stage is still missing for a shard."""

from collections import Counter
from dataclasses import dataclass

import dagster as dg

from groupmates_assets.defs.jobs import filter_pool_job, filter_shards_job
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import layout
from groupmates_assets.lib import shards as shard_io

MAX_RUNS_PER_TICK = 200  # filter runs requested per tick
MAX_NEW_SHARDS_PER_TICK = 1000  # partitions added per tick; the cursor carries on from the last one
MAX_FILTER_ATTEMPTS = 3  # failed (or canceled) filter runs per shard and classifier version before giving up
CLASSIFIER_VERSION_TAG = "groupmates/classifier_version"
FILTERED = dg.AssetKey("filtered_pool_shard")
_PAGE = 1000  # materialization records fetched per query


@dataclass(frozen=True)
class ShardChanges:
    """The pool directory now against the registered ``pool_shards`` partitions (all lists sorted)."""

    new: list[str]  # keys of shard files not yet registered
    vanished: list[str]  # registered partition keys whose file no longer exists
    problems: list[str]  # files skipped, by name and reason
    current: list[str]  # keys of every shard file present now


def shard_changes(instance: dg.DagsterInstance, platform: PlatformResource) -> ShardChanges:
    """Compare the pool directory with the registered partitions; changes nothing. A missing directory (a typo,
    an unmounted volume) is a problem, not an empty pool: no partition is reported vanished because of it."""
    fs, root = platform.pool_location()
    shards, problems = shard_io.discover_shards(fs, root)
    if not fs.exists(root.rstrip("/")):
        return ShardChanges([], [], problems, [])
    current = [shard.key for shard in shards]
    known = set(instance.get_dynamic_partitions(pool_shards.name))
    return ShardChanges(new=[key for key in current if key not in known],
                        vanished=sorted(known.difference(current)), problems=problems, current=current)


def sync_shard_partitions(instance: dg.DagsterInstance, platform: PlatformResource) -> ShardChanges:
    """Make the partitions what the pool directory holds now (add every new key, delete every vanished one), as
    the sensor does over its ticks; the demo command calls it before its backfill."""
    changes = shard_changes(instance, platform)
    if changes.new:
        instance.add_dynamic_partitions(pool_shards.name, changes.new)
    for key in changes.vanished:
        instance.delete_dynamic_partition(pool_shards.name, key)
    return changes


def next_batch(new_keys: list[str], cursor: str | None, cap: int) -> list[str]:
    """Up to ``cap`` new keys after the cursor (in key order); once the end is reached, from the start again, so
    keys that appear behind the cursor are picked up on a later tick."""
    after = [k for k in new_keys if cursor is None or k > cursor]
    return (after or new_keys)[:cap]


def current_classifier_version(platform: PlatformResource) -> str | None:
    """The classifier version the next filter run will use, or None before the first classifier.

    Read from the storage pointer (``quality/classifier/current.json``), not from the latest quality_classifier
    materialization: the pointer is what ``filtered_pool_shard`` reads and records as ``classifier_version``, so
    comparing against it converges (a filtered shard is done exactly when the filter would write the same), even
    when the store and the instance disagree (a store copied in, or reset)."""
    return layout.current_classifier_version(platform.storage())


def filtered_versions(instance: dg.DagsterInstance) -> dict[str, str | None]:
    """The ``classifier_version`` of each partition's latest ``filtered_pool_shard`` materialization: one query
    for the latest storage ids, then the records by id in pages (about 2 s at 10,000 partitions on SQLite)."""
    latest = instance.get_latest_storage_id_by_partition(FILTERED, dg.DagsterEventType.ASSET_MATERIALIZATION)
    ids, versions = sorted(latest.values()), {}
    for start in range(0, len(ids), _PAGE):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=FILTERED, storage_ids=ids[start:start + _PAGE]), limit=_PAGE).records
        for record in records:
            materialization = record.asset_materialization
            if materialization is not None and materialization.partition is not None:
                value = materialization.metadata.get("classifier_version")
                versions[materialization.partition] = None if value is None else str(value.value)
    return versions


def filter_runs(instance: dg.DagsterInstance, version: str) -> tuple[Counter[str], set[str]]:
    """Failed or canceled sensor filter runs per shard with this classifier version, and the shards with a filter
    run not finished yet (of any version or job): two run queries per tick, not one per shard."""
    ended = instance.get_runs(dg.RunsFilter(
        job_name=filter_pool_job.name, tags={CLASSIFIER_VERSION_TAG: version},
        statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]))
    failed = Counter(run.tags.get("dagster/partition", "") for run in ended)
    active = instance.get_runs(dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]))
    running = {run.tags.get("dagster/partition", "") for run in active
               if run.job_name in (filter_pool_job.name, filter_shards_job.name)
               or FILTERED in (run.asset_selection or ())}
    return failed, running


def filter_requests(instance: dg.DagsterInstance, pool: list[str], version: str) -> tuple[list[dg.RunRequest],
                                                                                          list[str]]:
    """Filter runs for up to MAX_RUNS_PER_TICK shards of ``pool`` whose latest filtered output is missing or from
    another classifier version, and the shards given up on (MAX_FILTER_ATTEMPTS failed runs with this version).

    Given-up shards and shards with a run in progress are left out before the cap, so they cannot fill the window.
    The run key counts earlier failed runs, so a retry is a new run and not deduplicated by the daemon."""
    done = filtered_versions(instance)
    failed, running = filter_runs(instance, version)
    stale = [key for key in pool if done.get(key) != version]
    exhausted = [key for key in stale if failed[key] >= MAX_FILTER_ATTEMPTS]
    wanted = [key for key in stale if failed[key] < MAX_FILTER_ATTEMPTS and key not in running]
    return [dg.RunRequest(partition_key=key, run_key=f"{key}@classifier-{version}#attempt-{failed[key]}",
                          tags={CLASSIFIER_VERSION_TAG: version})
            for key in wanted[:MAX_RUNS_PER_TICK]], exhausted


def _names(keys: list[str], shown: int = 20) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


@dg.sensor(
    job=filter_pool_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the pool directory (a folder or s3://...). Adds a partition for up to 1,000 new shard files "
    "per tick (a cursor carries on from the last key added) and deletes the partition of every shard whose file "
    "is gone; skipped files are logged with the reason. Once a quality classifier exists, requests a filter run "
    "(register + filter) for up to 200 shards per tick whose latest filtered output is missing or from another "
    "classifier version, leaving out shards with a filter run in progress; a shard whose filter run failed 3 "
    "times with the current classifier is not requested again and is reported (a new classifier retries it).",
)
def pool_shard_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource) -> dg.SensorResult:
    changes = shard_changes(context.instance, platform)
    for problem in changes.problems:
        context.log.warning(problem)
    for key in changes.vanished:
        context.log.warning(f"shard {key}: its file is no longer in the pool directory; deleting its partition")
    batch = next_batch(changes.new, context.cursor, MAX_NEW_SHARDS_PER_TICK)
    cursor = batch[-1] if batch else context.cursor
    requests = [pool_shards.build_add_request(batch)] if batch else []
    if changes.vanished:
        requests.append(pool_shards.build_delete_request(changes.vanished))
    if len(batch) < len(changes.new):
        context.log.info(f"{len(changes.new):,} new shards; adding {len(batch):,} this tick, up to {batch[-1]}")
    version = current_classifier_version(platform)
    if version is None:
        return dg.SensorResult(
            dynamic_partitions_requests=requests, cursor=cursor,
            skip_reason=f"registered {len(batch)} new shards; waiting for quality_classifier before filtering",
        )
    unregistered = set(changes.new).difference(batch)
    runs, exhausted = filter_requests(context.instance, [k for k in changes.current if k not in unregistered],
                                      version)
    given_up = ""
    if exhausted:
        given_up = (f"{len(exhausted)} shards failed {MAX_FILTER_ATTEMPTS} filter runs with classifier {version} "
                    f"and are not requested again: {_names(exhausted)}")
        context.log.warning(given_up + " (see the failed runs; a new classifier retries them)")
    return dg.SensorResult(
        run_requests=runs, dynamic_partitions_requests=requests, cursor=cursor,
        skip_reason=None if runs or requests else (given_up or "no new, vanished or unfiltered shards"),
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
