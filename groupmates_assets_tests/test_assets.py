"""Assets materialized with Dagster on a small hand-written pool, plus the shard sensor."""

from __future__ import annotations

import dagster as dg
import pytest

from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.pool.assets import embedded_pool, pool_shard
from groupmates_assets.defs.pool.sensors import pool_shard_sensor
from groupmates_assets.defs.quality.assets import filtered_pool_shard, filtered_pool_summary, quality_classifier
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets_tests.conftest import jsonl_bytes, records, write_shard

pytestmark = pytest.mark.unit

ASSETS = [embedded_pool, pool_shard, quality_classifier, filtered_pool_shard, filtered_pool_summary]
KEYS = ["crawl-a__part-0", "crawl-a__part-1", "crawl-b"]


@pytest.fixture
def setup(small_pool, tmp_path):
    platform = PlatformResource(storage_root=str(tmp_path / "store"), pool_dir=str(small_pool["pool"]))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield {"platform": platform, "instance": instance, "positives": str(small_pool["positives"]),
               "pool": small_pool["pool"]}


def _materialize(setup, selection, partition_key=None, raise_on_error=True):
    return dg.materialize(
        ASSETS, selection=selection, partition_key=partition_key, instance=setup["instance"],
        resources={"platform": setup["platform"]}, raise_on_error=raise_on_error,
        run_config={"ops": {"quality_classifier": {"config": {"positives_path": setup["positives"]}}}}
        if "quality_classifier" in selection else None,
    )


def _register_and_train(setup, keys=KEYS):
    setup["instance"].add_dynamic_partitions(pool_shards.name, keys)
    for key in keys:
        _materialize(setup, ["pool_shard"], key)
    return _materialize(setup, ["quality_classifier"])


def test_pool_shard_records_hash_and_size(setup):
    setup["instance"].add_dynamic_partitions(pool_shards.name, KEYS)
    result = _materialize(setup, ["pool_shard"], "crawl-b")
    metadata = result.asset_materializations_for_node("pool_shard")[0].metadata
    assert metadata["format"].value == "parquet" and len(metadata["sha256"].value) == 64


def test_classifier_then_filter_every_shard(setup):
    trained = _register_and_train(setup).asset_materializations_for_node("quality_classifier")[0].metadata
    assert trained["heldout_auc"].value > 0.7  # positives vs a pool that is half prose
    assert trained["positives_train"].value > 0 and trained["negatives_train"].value > 0
    assert "data:image/png;base64" in trained["heldout_score_histogram"].value
    totals = {"rows_in": 0, "kept": 0, "dropped": 0, "rejected": 0, "heldout": 0}
    for key in KEYS:
        result = _materialize(setup, ["filtered_pool_shard"], key)
        metadata = result.asset_materializations_for_node("filtered_pool_shard")[0].metadata
        check = result.get_asset_check_evaluations()[0]
        assert check.passed and check.check_name == "counts_reconcile"
        for name in totals:
            totals[name] += metadata[name].value
        assert metadata["classifier_version"].value == trained["classifier_version"].value
    assert totals == {"rows_in": 342, "kept": totals["kept"], "dropped": totals["dropped"], "rejected": 2,
                      "heldout": totals["heldout"]}
    assert totals["kept"] + totals["dropped"] + totals["heldout"] == 340
    assert 0 < totals["kept"] < 340
    summary = _materialize(setup, ["filtered_pool_summary"])
    assert summary.get_asset_check_evaluations()[0].passed
    metadata = summary.asset_materializations_for_node("filtered_pool_summary")[0].metadata
    assert metadata["kept"].value == totals["kept"] and metadata["shards"].value == 3
    assert "spam" in metadata["keep_rate_by_group"].value
    held = [row for k in KEYS for row in setup["platform"].storage().read_parquet(
        f"filtered_pool/{k}/heldout.parquet").to_pylist()]
    assert len(held) == totals["heldout"] == metadata["heldout"].value == sum(
        metadata["heldout_by_group"].value.values()) > 0
    stats = [setup["platform"].storage().read_json(f"filtered_pool/{k}/stats.json") for k in KEYS]
    keep_rate = {g: sum(s["by_group"][g]["kept"] for s in stats) / sum(s["by_group"][g]["in"] for s in stats)
                 for g in ("prose", "spam")}
    assert keep_rate["prose"] > keep_rate["spam"]


def test_unreadable_shard_fails_with_file_and_cause(setup):
    (setup["pool"] / "broken.jsonl.gz").write_bytes(b"definitely not gzip")
    _register_and_train(setup, [*KEYS, "broken"])
    result = _materialize(setup, ["filtered_pool_shard"], "broken", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.user_failure_data.description
    assert "broken.jsonl.gz" in message and "not a valid jsonl.gz" in message


def test_filter_refuses_unregistered_partition(setup):
    setup["instance"].add_dynamic_partitions(pool_shards.name, ["crawl-b"])
    result = _materialize(setup, ["filtered_pool_shard"], "crawl-b", raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "not registered" in failure.step_failure_data.user_failure_data.description


def test_sensor_adds_partitions_then_requests_filter_runs(setup):
    instance, resources = setup["instance"], {"platform": setup["platform"]}
    first = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert first.dynamic_partitions_requests[0].partition_keys == KEYS
    assert not first.run_requests and "waiting for quality_classifier" in first.skip_reason.skip_message
    _register_and_train(setup)  # adds the partitions, registers, trains
    second = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert not second.dynamic_partitions_requests
    assert sorted(r.partition_key for r in second.run_requests) == KEYS
    _materialize(setup, ["filtered_pool_shard"], "crawl-b")
    write_shard(setup["pool"] / "crawl-c.jsonl", jsonl_bytes(records(3, 3)))
    third = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert third.dynamic_partitions_requests[0].partition_keys == ["crawl-c"]
    assert sorted(r.partition_key for r in third.run_requests) == ["crawl-a__part-0", "crawl-a__part-1", "crawl-c"]
    assert all("@classifier-" in r.run_key for r in third.run_requests)


def test_supplied_model_with_fixed_threshold(setup, tmp_path):
    from groupmates_assets.lib.quality import FastTextRecipe, train_quality_classifier
    from groupmates_assets_tests.conftest import bad_texts, good_texts

    storage = setup["platform"].storage()
    local = tmp_path / "supplied.bin"
    train_quality_classifier(good_texts(100), bad_texts(100), str(local), FastTextRecipe(epoch=5))
    storage.put_file(str(local), "models/supplied.bin")  # a relative model path resolves in the storage root
    setup["instance"].add_dynamic_partitions(pool_shards.name, KEYS)
    for key in KEYS:
        _materialize(setup, ["pool_shard"], key)
    result = dg.materialize(
        ASSETS, selection=["quality_classifier"], instance=setup["instance"],
        resources={"platform": setup["platform"]},
        run_config={"ops": {"quality_classifier": {"config": {"model_path": "models/supplied.bin",
                                                               "threshold": 0.018112}}}},
    )
    metadata = result.asset_materializations_for_node("quality_classifier")[0].metadata
    assert metadata["threshold"].value == 0.018112
    assert metadata["threshold_rule"].value == "fixed threshold 0.018112"
    assert "heldout_auc" not in metadata  # nothing was trained
    assert storage.read_json("quality/classifier/current.json")["training"]["supplied_model"].endswith(
        "models/supplied.bin")
    missing = dg.materialize(
        ASSETS, selection=["quality_classifier"], instance=setup["instance"],
        resources={"platform": setup["platform"]}, raise_on_error=False,
        run_config={"ops": {"quality_classifier": {"config": {"model_path": "models/absent.bin"}}}},
    )
    failure = next(e for e in missing.all_events if e.is_step_failure)
    assert "supplied quality model not found" in failure.step_failure_data.user_failure_data.description


def test_object_store_root_works_like_a_folder(small_pool, tmp_path):
    """The same assets on a non-local fsspec root (memory://, as s3:// in production)."""
    platform = PlatformResource(storage_root=f"memory://groupmates-{tmp_path.name}", pool_dir=str(small_pool["pool"]))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        setup = {"platform": platform, "instance": instance, "positives": str(small_pool["positives"])}
        _register_and_train(setup)
        result = _materialize(setup, ["filtered_pool_shard"], "crawl-b")
        assert result.get_asset_check_evaluations()[0].passed
    storage = platform.storage()
    assert not storage.is_local
    assert storage.read_parquet("filtered_pool/crawl-b/kept.parquet").num_rows > 0
    assert storage.url("filtered_pool").startswith("memory://")


def test_sensor_cursor_caps_new_shards_per_tick(setup, monkeypatch):
    """With 3 new shards and a cap of 2 a tick, the cursor carries on where the last tick stopped."""
    from groupmates_assets.defs.pool import sensors

    monkeypatch.setattr(sensors, "MAX_NEW_SHARDS_PER_TICK", 2)
    instance, resources = setup["instance"], {"platform": setup["platform"]}
    first = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert first.dynamic_partitions_requests[0].partition_keys == KEYS[:2] and first.cursor == KEYS[1]
    instance.add_dynamic_partitions(pool_shards.name, KEYS[:2])
    second = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor))
    assert second.dynamic_partitions_requests[0].partition_keys == KEYS[2:] and second.cursor == KEYS[-1]
    instance.add_dynamic_partitions(pool_shards.name, KEYS[2:])
    write_shard(setup["pool"] / "aaa-early.jsonl", jsonl_bytes(records(2, 2)))  # sorts before the cursor
    third = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=second.cursor))
    assert third.dynamic_partitions_requests[0].partition_keys == ["aaa-early"]


def test_nightly_backfill_requests_each_missing_stage_whose_inputs_exist(setup):
    from groupmates_assets.defs.pool.sensors import missing_shard_runs, missing_shards_backfill

    instance = setup["instance"]
    assert isinstance(missing_shards_backfill(dg.build_schedule_context(instance=instance)), dg.SkipReason)
    _register_and_train(setup)  # partitions registered, classifier trained, nothing filtered yet
    requests = missing_shard_runs(instance)
    assert sorted(r.partition_key for r in requests) == KEYS
    assert {tuple(k.to_user_string() for k in r.asset_selection) for r in requests} == {
        ("pool_shard", "filtered_pool_shard")}
    _materialize(setup, ["filtered_pool_shard"], "crawl-b")  # crawl-b moves on to tokenization
    by_stage = {(r.partition_key, r.tags["groupmates/backfill"]) for r in missing_shard_runs(instance)}
    assert ("crawl-b", "tokenized_pool_shard") in by_stage and ("crawl-b", "filtered_pool_shard") not in by_stage
    assert not any(stage == "pool_predictions" for _, stage in by_stage)  # no influence models yet
    assert len(missing_shard_runs(instance, limit=1)) == 1


def _materialize_range(setup, selection, first, last, raise_on_error=True):
    """One run over the partitions first..last, as a backfill under ``BackfillPolicy.multi_run(n)`` launches it."""
    return dg.materialize(
        ASSETS, selection=selection, instance=setup["instance"], resources={"platform": setup["platform"]},
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        raise_on_error=raise_on_error)


def test_one_run_over_several_shards_matches_one_run_per_shard(setup, tmp_path):
    _register_and_train(setup)
    batched = _materialize_range(setup, ["filtered_pool_shard"], KEYS[0], KEYS[-1])
    events = {e.partition: e.metadata for e in batched.asset_materializations_for_node("filtered_pool_shard")}
    assert sorted(events) == sorted(KEYS)  # every partition materialized, each with its own counts
    storage = setup["platform"].storage()
    for key in KEYS:
        stats = storage.read_json(f"filtered_pool/{key}/stats.json")
        assert events[key]["rows_in"].value == stats["rows_in"] and events[key]["kept"].value == stats["kept"]
    assert len({events[k]["rows_in"].value for k in KEYS}) > 1
    [check] = batched.get_asset_check_evaluations()
    assert check.passed and check.metadata["failed_partitions"].value == "none"
    batched_bytes = {k: storage.read_bytes(f"filtered_pool/{k}/kept.parquet") for k in KEYS}
    for key in KEYS:  # the same files as a run per shard writes
        _materialize(setup, ["filtered_pool_shard"], key)
        assert storage.read_bytes(f"filtered_pool/{key}/kept.parquet") == batched_bytes[key]


def test_ranged_run_fails_whole_when_one_shard_is_unreadable(setup):
    (setup["pool"] / "broken.jsonl.gz").write_bytes(b"definitely not gzip")
    _register_and_train(setup, ["broken", *KEYS])
    result = _materialize_range(setup, ["filtered_pool_shard"], "broken", KEYS[-1], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "broken.jsonl.gz" in str(failure.event_specific_data.error.message)
    assert not result.asset_materializations_for_node("filtered_pool_shard")
