"""Load: concurrent runs on PostgreSQL storage lose and duplicate nothing; the asset pages answer at 10,000 shards.

Speed is measured in bench/ (`python -m bench.run --only postgres_runs`, `--only asset_pages`); these tests check
only what must hold under the load, never how fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import pytest

from groupmates_assets.testing.concurrent_runs import prepare_instance, reconcile, run_workers, write_pool
from groupmates_assets.testing.postgres_server import Postgres, create_database, write_compose_instance_home

WORKERS = 4
RUNS_PER_WORKER = 6


@pytest.mark.integration
def test_concurrent_runs_on_postgres_lose_and_duplicate_no_events(postgres: Postgres, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """Four OS processes on one instance (docker/dagster.yaml's PostgreSQL storage) materialize `pool_shard`, one run
    per partition; two processes take the same partitions in the same order, so each of the 12 partitions is
    materialized twice, by two processes at about the same moment. Every run succeeds; the event log holds exactly
    the events each process wrote for each run, once; each partition has exactly two materializations, from the
    runs that were for it; and the artifacts are whole."""
    database = "dagster_load_test"
    create_database(postgres, database)
    groups = WORKERS // 2
    keys = [f"load-{g}-{i:02d}" for g in range(groups) for i in range(RUNS_PER_WORKER)]
    pool, store = tmp_path / "pool", tmp_path / "store"
    write_pool(pool, keys)
    assignments = [keys[(w % groups) * RUNS_PER_WORKER:(w % groups + 1) * RUNS_PER_WORKER] for w in range(WORKERS)]
    home = write_compose_instance_home(tmp_path / "dagster_home")
    env = {**postgres.instance_env(database), "DAGSTER_HOME": str(home)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert prepare_instance(home, keys) == "PostgresEventLogStorage"  # schema made before four processes open it

    reports, _ = run_workers(assignments, env=env, pool=pool, storage_root=store)

    runs = [run for report in reports for run in report.runs]
    assert len(runs) == WORKERS * RUNS_PER_WORKER and all(run["success"] for run in runs)
    # The processes ran at once: a moment when every one of them had started and none had finished.
    assert max(r.runs[0]["start"] for r in reports) < min(r.runs[-1]["end"] for r in reports)
    expected = dict.fromkeys(keys, 2)
    connection = postgres.connect(database)
    try:
        assert reconcile(connection, reports, expected) == []

        with dg.DagsterInstance.get() as instance:  # and as Dagster reads it back (what the UI shows)
            assert instance.get_runs_count() == len(runs)
            assert {r.status for r in instance.get_runs()} == {dg.DagsterRunStatus.SUCCESS}
            assert instance.get_materialized_partitions(dg.AssetKey("pool_shard")) == set(keys)
            events = instance.fetch_materializations(dg.AssetKey("pool_shard"), limit=1000).records
            assert len(events) == len(runs)
            assert {e.run_id for e in events} == {run["run_id"] for run in runs}
        for key in keys:
            manifest = json.loads((store / "pool" / "shards" / key / "manifest.json").read_text())
            assert manifest["sha256"] == hashlib.sha256((pool / f"{key}.jsonl").read_bytes()).hexdigest()

        # The reconciliation is not vacuous: lose one run's success event and store a materialization twice.
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM event_logs WHERE id = (SELECT max(id) FROM event_logs "
                           "WHERE dagster_event_type = %s) RETURNING run_id", (dg.DagsterEventType.RUN_SUCCESS.value,))
            (lost_run,) = cursor.fetchone()
            columns = "run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition"
            cursor.execute(f"INSERT INTO event_logs ({columns}) SELECT {columns} FROM event_logs WHERE id = (SELECT "
                           "min(id) FROM event_logs WHERE dagster_event_type = %s) RETURNING run_id, partition",
                           (dg.DagsterEventType.ASSET_MATERIALIZATION.value,))
            doubled_run, doubled_partition = cursor.fetchone()
        connection.commit()
        problems = reconcile(connection, reports, expected)
    finally:
        connection.close()
    assert any(p.startswith(f"run {lost_run}: its worker wrote") for p in problems), problems
    assert any(p.startswith(f"run {doubled_run}: its worker wrote") for p in problems), problems
    assert f"pool_shard[{doubled_partition}]: 3 materializations, want 2" in problems
    assert "1 events are stored more than once" in problems


@pytest.mark.unit  # in-process GraphQL over a SQLite instance: no server
def test_asset_pages_answer_at_10000_partitions(tmp_path: Path):
    """The GraphQL queries behind an asset's page, its partitions and the asset graph (the webserver's own, through
    dagster-graphql over the project's code location) give the right counts with 10,000 registered shards, and
    "Materialize all" stores a backfill of all 10,000 (timings: `python -m bench.run --only asset_pages`)."""
    from bench.bench_asset_pages import (
        ASSET_GRAPH_LIVE,
        LATEST_PARTITIONS,
        LAUNCH_BACKFILL,
        PARTITION_DETAIL,
        PARTITION_HEALTH,
        AssetPages,
        asset_key,
        record_materializations,
        shard_keys,
    )

    shards, materialized = 10_000, 50
    keys = shard_keys(shards)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions("pool_shards", keys)
        record_materializations(instance, keys[:materialized], "pool_shard")
        with AssetPages(instance) as pages:
            pool, filtered = asset_key("pool_shard"), asset_key("filtered_pool_shard")
            node = pages.query(PARTITION_HEALTH, {"assetKey": pool})["assetNodeOrError"]
            assert node["partitionKeysByDimension"][0]["partitionKeys"] == keys
            statuses = node["assetPartitionStatuses"]
            assert sorted(statuses["materializedPartitions"]) == keys[:materialized]
            assert statuses["failedPartitions"] == statuses["materializingPartitions"] == []

            live = pages.query(ASSET_GRAPH_LIVE, {"assetKeys": pages.all_asset_keys()})["assetNodes"]
            stats = {n["assetKey"]["path"][0]: n["partitionStats"] for n in live}
            assert stats["pool_shard"] == {"numMaterialized": materialized, "numMaterializing": 0,
                                           "numPartitions": shards, "numFailed": 0}
            assert stats["filtered_pool_shard"]["numPartitions"] == shards
            assert stats["filtered_pool_shard"]["numMaterialized"] == 0

            latest = pages.query(LATEST_PARTITIONS, {"assetKey": pool, "limit": 100})["assetNodeOrError"]
            assert latest["partitionKeyConnection"]["results"] == keys[::-1][:100]
            detail = pages.query(PARTITION_DETAIL, {"assetKey": pool, "partitionKey": keys[-1]})["assetOrError"]
            assert detail["assetEventHistory"]["results"] == []  # registered, never materialized
            detail = pages.query(PARTITION_DETAIL, {"assetKey": pool, "partitionKey": keys[0]})["assetOrError"]
            assert [e["partition"] for e in detail["assetEventHistory"]["results"]] == [keys[0]]

            launched = pages.query(LAUNCH_BACKFILL, {"backfillParams": {
                "partitionNames": keys, "assetSelection": [filtered]}})["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill = instance.get_backfill(launched["backfillId"])
        target = backfill.asset_backfill_data.target_subset
        assert target.num_partitions_and_non_partitioned_assets == shards
        assert set(target.get_partitions_subset(dg.AssetKey("filtered_pool_shard")).get_partition_keys()) == set(keys)
