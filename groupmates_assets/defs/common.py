"""Small helpers every stage's assets share: JSON-safe metadata values, the failure a retry cannot fix, and several
shards per backfill run."""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from groupmates_assets.lib.layout import MissingArtifactError


class PermanentFailure(dg.Failure):
    """A step failure no retry can fix (bad input, a missing upstream, settings that do not fit), with a message
    that says what to fix. Raised with ``allow_retries=False``, so the steps' retry policy (``STEP_RETRY``) leaves
    it alone and the message arrives at once; any other exception (storage, memory) is retried."""

    def __init__(self, description: str | None = None, metadata: dict | None = None):
        super().__init__(description=description, metadata=metadata, allow_retries=False)


@contextlib.contextmanager
def missing_is_permanent() -> Iterator[None]:
    """A missing upstream artifact (``layout.MissingArtifactError``) as a :class:`PermanentFailure` with the same
    message: materializing the asset it names is the fix, and no retry is."""
    try:
        yield
    except MissingArtifactError as error:
        raise PermanentFailure(str(error)) from None


def shard_batches() -> dg.BackfillPolicy:
    """Backfill policy of the per-shard assets: up to ``pool.shards_per_run`` shards of the active profile per run.
    A run per shard would spend more time starting (a process, the code location, the models) than working on
    the embedded pool's small shards; the discovery sensor still launches one run per new shard."""
    from groupmates_assets.settings import get_profile

    return dg.BackfillPolicy.multi_run(get_profile().pool.shards_per_run)


def shard_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The run's pool-shard partition keys, each checked before it becomes part of a path. Dagster accepts almost
    any dynamic partition key, so a key added by hand fails here, before any model is loaded or file written, and
    no retry is spent on it."""
    from groupmates_assets.lib.shards import InvalidShardKeyError, validate_shard_key

    try:
        return [validate_shard_key(key) for key in context.partition_keys]
    except InvalidShardKeyError as error:
        raise PermanentFailure(str(error)) from error


@dataclass
class PartitionResult:
    """What one partition of a run reports: its metadata, the version of its data and, for an asset with a
    check, whether the check passed and why."""

    metadata: dict[str, Any]
    data_version: str | None = None
    check_passed: bool | None = None
    check_metadata: dict[str, Any] = field(default_factory=dict)


def materialize_partitions(context: dg.AssetExecutionContext, materialize_one: Callable[[str], PartitionResult],
                           check_name: str | None = None) -> dg.MaterializeResult:
    """Materialize every partition of the run (one, or a range under :func:`shard_batches`) with
    ``materialize_one(key)``. Each partition keeps its own metadata in the UI; the check (if any) passes only when
    it passed for every partition, and names the ones that did not. A failure fails the whole run: rerunning
    redoes the range, and every write is idempotent."""
    keys = shard_keys(context)
    results: dict[str, PartitionResult] = {}
    for number, key in enumerate(keys, 1):
        results[key] = materialize_one(key)
        if len(keys) > 1:
            context.log.info(f"{key}: done ({number}/{len(keys)} partitions of this run)")
    check_results = [_combined_check(check_name, results)] if check_name else None
    if len(keys) == 1:
        only = results[keys[0]]
        return dg.MaterializeResult(metadata=only.metadata, check_results=check_results,
                                    data_version=dg.DataVersion(only.data_version) if only.data_version else None)
    for key, result in results.items():
        context.add_asset_metadata(result.metadata, partition_key=key)
    return dg.MaterializeResult(metadata={"partitions_in_run": len(keys)}, check_results=check_results)


def _combined_check(check_name: str, results: dict[str, PartitionResult]) -> dg.AssetCheckResult:
    failed = [key for key, result in results.items() if not result.check_passed]
    if len(results) == 1:
        metadata = next(iter(results.values())).check_metadata
    else:
        metadata = {"partitions": len(results), "failed_partitions": ", ".join(failed) or "none",
                    **({f"{failed[0]}/{k}": v for k, v in results[failed[0]].check_metadata.items()} if failed else {})}
    return dg.AssetCheckResult(check_name=check_name, passed=not failed, metadata=metadata,
                               severity=dg.AssetCheckSeverity.ERROR)


def blocking_check(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    """A check whose failure stops the asset's downstream assets: the invariants the next stage relies on."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)
