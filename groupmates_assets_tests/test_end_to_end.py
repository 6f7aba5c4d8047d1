"""The main job end to end, as `make demo` runs it, with the `ci` profile's tiny LM and few trajectories."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pyarrow.parquet as pq


def test_demo_runs_every_stage_through_a_persistent_instance(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_"))}
    env.update(GROUPMATES_HOME=str(tmp_path), GROUPMATES_PROFILE="ci")
    run = subprocess.run([sys.executable, "-m", "groupmates_assets.cli", "demo"], env=env, capture_output=True,
                         text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "oracle labels:" in run.stdout
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    for key in ("embedded_pool", "quality_classifier", "filtered_pool_summary", "probe_checkpoint",
                "reference_set", "probe_pool"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    shards = instance.get_dynamic_partitions("pool_shards")
    assert len(shards) >= 8
    for key in ("filtered_pool_shard", "tokenized_pool_shard"):
        assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(shards), key
    assert instance.get_materialized_partitions(dg.AssetKey("oracle_random")) == {"block-000", "block-001"}

    summary = instance.get_latest_materialization_event(dg.AssetKey("filtered_pool_summary"))
    metadata = summary.asset_materialization.metadata
    assert metadata["rows_in"].value >= 20_000
    assert metadata["rows_in"].value == metadata["kept"].value + metadata["dropped"].value + metadata[
        "rejected"].value
    assert 0.3 < metadata["keep_rate"].value < 0.7  # the profile keeps about half
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key([
        dg.AssetCheckKey(dg.AssetKey("filtered_pool_summary"), "all_shards_reconcile"),
        dg.AssetCheckKey(dg.AssetKey("oracle_random"), "labels_consistent"),
    ])
    assert len(checks) == 2 and all(c.status.value == "SUCCEEDED" for c in checks.values())

    oracle_root = tmp_path / "storage" / "oracle" / "random"
    parts = sorted(oracle_root.glob("*/block-*/part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert sorted(r["trajectory_id"] for r in rows) == [0, 1, 2, 3]
    for row in rows:
        assert len(row["context_id"]) == 10 and len(set(row["context_id"])) == 10
        assert abs(sum(row["marginal"]) - (row["final_loss"] - row["base_loss"])) < 1e-4

    # A killed block reruns without duplicates: drop one part, rematerialize, get exactly that part back.
    from groupmates_assets.defs.oracle.assets import oracle_random
    from groupmates_assets.defs.resources import PlatformResource

    block_parts = sorted(oracle_root.glob("*/block-000/part-*.parquet"))
    original = pq.read_table(block_parts[-1])
    block_parts[-1].unlink()
    platform = PlatformResource(storage_root=str(tmp_path / "storage"), profile="ci")
    result = dg.materialize([oracle_random], partition_key="block-000", instance=instance,
                            resources={"platform": platform})
    metadata = result.asset_materializations_for_node("oracle_random")[0].metadata
    assert metadata["resumed_parts"].value == len(block_parts) - 1
    assert metadata["computed_trajectories"].value == 1 and metadata["trajectories"].value == 2
    assert pq.read_table(block_parts[-1]).equals(original)  # same plan, same labels (T9)
