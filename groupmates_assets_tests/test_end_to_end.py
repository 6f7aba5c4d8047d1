"""The main job end to end, as `make demo` runs it: embedded pool -> classifier -> filtered pool."""

from __future__ import annotations

import dagster as dg

from groupmates_assets import cli


def test_demo_runs_every_stage_through_a_persistent_instance(monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPMATES_HOME", str(tmp_path))
    for name in ("DAGSTER_HOME", "GROUPMATES_STORAGE_ROOT", "GROUPMATES_POOL_DIR", "GROUPMATES_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["demo"]) == 0
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    for key in ("embedded_pool", "quality_classifier", "filtered_pool_summary"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    shards = instance.get_dynamic_partitions("pool_shards")
    assert len(shards) >= 8
    assert instance.get_materialized_partitions(dg.AssetKey("filtered_pool_shard")) == set(shards)
    summary = instance.get_latest_materialization_event(dg.AssetKey("filtered_pool_summary"))
    metadata = summary.asset_materialization.metadata
    assert metadata["rows_in"].value >= 20_000
    assert metadata["rows_in"].value == metadata["kept"].value + metadata["dropped"].value + metadata[
        "rejected"].value
    assert 0.3 < metadata["keep_rate"].value < 0.7  # the demo profile keeps about half
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("filtered_pool_summary"), "all_shards_reconcile")])
    assert all(c.status.value == "SUCCEEDED" for c in check.values())
