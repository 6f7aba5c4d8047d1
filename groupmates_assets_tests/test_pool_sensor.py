"""The pool shard sensor and the shard sync on real Dagster instances: classifier versions, bounded retries of
failing shards, vanished shard files, and file discovery reports."""

from __future__ import annotations

import uuid

import dagster as dg
import pytest

from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.pool import sensors
from groupmates_assets.defs.pool.sensors import (
    CLASSIFIER_VERSION_TAG,
    MAX_FILTER_ATTEMPTS,
    filter_requests,
    pool_shard_sensor,
    shard_changes,
    sync_shard_partitions,
)
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib.layout import CURRENT_CLASSIFIER
from groupmates_assets_tests.conftest import jsonl_bytes, records, write_shard
from groupmates_assets_tests.test_assets import (  # noqa: F401  (setup: the fixture, reused)
    ASSETS,
    KEYS,
    _materialize,
    _register_and_train,
    setup,
)

pytestmark = pytest.mark.unit


def _tick(env, cursor=None):
    return pool_shard_sensor(dg.build_sensor_context(
        instance=env["instance"], cursor=cursor, resources={"platform": env["platform"]}))


def _set_classifier_version(env, version):
    """A new classifier, as the filter sees it: the storage pointer with another version."""
    storage = env["platform"].storage()
    storage.write_json(CURRENT_CLASSIFIER, {**storage.read_json(CURRENT_CLASSIFIER), "version": version}
                       if storage.exists(CURRENT_CLASSIFIER) else {"version": version})


def _add_run(env, key, version, status):
    env["instance"].add_run(dg.DagsterRun(
        job_name=sensors.filter_pool_job.name, run_id=str(uuid.uuid4()), status=status,
        tags={"dagster/partition": key, CLASSIFIER_VERSION_TAG: version}))


def test_new_classifier_version_makes_every_filtered_shard_eligible_again(setup):  # noqa: F811
    version = _register_and_train(setup).asset_materializations_for_node("quality_classifier")[0].metadata[
        "classifier_version"].value
    for key in KEYS:
        _materialize(setup, ["filtered_pool_shard"], key)
    steady = _tick(setup)
    assert not steady.run_requests and "no new, vanished or unfiltered shards" in steady.skip_reason.skip_message
    _set_classifier_version(setup, "next-classifier")
    again = _tick(setup)
    assert [r.partition_key for r in again.run_requests] == KEYS
    assert [r.run_key for r in again.run_requests] == [f"{k}@classifier-next-classifier#attempt-0" for k in KEYS]
    assert all(r.tags[CLASSIFIER_VERSION_TAG] == "next-classifier" for r in again.run_requests)
    _set_classifier_version(setup, version)  # back to the version the shards were filtered with
    assert not _tick(setup).run_requests


def test_failing_shard_is_retried_a_bounded_number_of_times_then_reported(setup, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sensors, "MAX_RUNS_PER_TICK", 2)
    setup["instance"].add_dynamic_partitions(pool_shards.name, KEYS)
    _set_classifier_version(setup, "v1")
    broken, others = KEYS[0], KEYS[1:]
    for attempt in range(MAX_FILTER_ATTEMPTS):
        tick = _tick(setup)
        assert [r.partition_key for r in tick.run_requests] == [broken, others[0]]  # the first two keys, cap 2
        assert tick.run_requests[0].run_key == f"{broken}@classifier-v1#attempt-{attempt}"
        _add_run(setup, broken, "v1", dg.DagsterRunStatus.FAILURE)
    runs, exhausted = filter_requests(setup["instance"], KEYS, "v1")
    assert exhausted == [broken]
    assert [r.partition_key for r in runs] == others  # the given-up shard does not take a place in the window
    for key in others:  # in progress: not requested again
        _add_run(setup, key, "v1", dg.DagsterRunStatus.STARTED)
    quiet = _tick(setup)
    assert not quiet.run_requests
    assert f"failed {MAX_FILTER_ATTEMPTS} filter runs with classifier v1" in quiet.skip_reason.skip_message
    assert broken in quiet.skip_reason.skip_message
    _add_run(setup, broken, "v0", dg.DagsterRunStatus.FAILURE)  # failures with another classifier do not count
    _set_classifier_version(setup, "v2")  # a new classifier retries it
    retried = _tick(setup).run_requests
    assert [(r.partition_key, r.run_key) for r in retried] == [(broken, f"{broken}@classifier-v2#attempt-0")]


def test_vanished_shard_is_deleted_and_left_out_of_the_summary(setup):  # noqa: F811
    _register_and_train(setup)
    for key in KEYS:
        _materialize(setup, ["filtered_pool_shard"], key)
    (setup["pool"] / "crawl-b.parquet").unlink()
    tick = _tick(setup)
    deletes = [r for r in tick.dynamic_partitions_requests if isinstance(r, dg.DeleteDynamicPartitionsRequest)]
    assert [list(r.partition_keys) for r in deletes] == [["crawl-b"]]
    assert not tick.run_requests  # the other shards are filtered with the current classifier
    setup["instance"].delete_dynamic_partition(pool_shards.name, "crawl-b")
    _materialize(setup, ["quality_classifier"])  # samples the current pool only
    assert setup["platform"].storage().read_json(CURRENT_CLASSIFIER)["negative_sample_shards"] == KEYS[:2]
    for key in KEYS[:2]:
        _materialize(setup, ["filtered_pool_shard"], key)
    summary = _materialize(setup, ["filtered_pool_summary"])
    assert summary.get_asset_check_evaluations()[0].passed
    metadata = summary.asset_materializations_for_node("filtered_pool_summary")[0].metadata
    assert metadata["shards"].value == 2 and metadata["shards_no_longer_in_pool"].value == 1
    assert metadata["left_out_shards"].value == "crawl-b"
    manifest = setup["platform"].storage().read_json("filtered_pool/_manifest.json")
    assert [s["key"] for s in manifest["shards"]] == KEYS[:2]
    assert manifest["rows_in"] == 342 - 100  # crawl-b held 100 records


def test_sync_makes_the_partitions_what_a_new_pool_folder_holds(setup, tmp_path):  # noqa: F811
    setup["instance"].add_dynamic_partitions(pool_shards.name, KEYS)
    other = tmp_path / "other-pool"
    write_shard(other / "c4-train.00001-of-01024.json.gz", jsonl_bytes(records(3, 2)))
    (other / "notes.txt").write_text("not a shard")
    platform = PlatformResource(storage_root=setup["platform"].storage_root, pool_dir=str(other))
    changes = sync_shard_partitions(setup["instance"], platform)
    assert changes.new == changes.current == ["c4-train.00001-of-01024"] and changes.vanished == KEYS
    assert changes.problems == [f"{other / 'notes.txt'}: skipped: not a shard file (expected one of "
                                f"{', '.join(sensors.shard_io.SHARD_SUFFIXES)})"]
    assert list(setup["instance"].get_dynamic_partitions(pool_shards.name)) == ["c4-train.00001-of-01024"]
    result = dg.materialize(ASSETS, selection=["pool_shard"], partition_key="c4-train.00001-of-01024",
                            instance=setup["instance"], resources={"platform": platform})
    assert result.asset_materializations_for_node("pool_shard")[0].metadata["format"].value == "jsonl.gz"
    assert sync_shard_partitions(setup["instance"], platform).new == []


def test_missing_pool_directory_deletes_nothing(setup, tmp_path):  # noqa: F811
    setup["instance"].add_dynamic_partitions(pool_shards.name, KEYS)
    platform = PlatformResource(storage_root=setup["platform"].storage_root, pool_dir=str(tmp_path / "typo"))
    changes = shard_changes(setup["instance"], platform)
    assert changes.vanished == [] and "does not exist" in changes.problems[0]


@pytest.mark.parametrize("name", ["notes.txt", ".DS_Store"])
def test_sensor_registers_healthy_shards_past_a_skipped_file(setup, name):  # noqa: F811
    (setup["pool"] / name).write_text("x")
    tick = _tick(setup)
    assert tick.dynamic_partitions_requests[0].partition_keys == KEYS
    assert any(p.startswith(f"{setup['pool'] / name}: skipped: ")
               for p in shard_changes(setup["instance"], setup["platform"]).problems)
