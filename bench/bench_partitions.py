"""Shard discovery and backfills at 10,000 dynamic shard partitions, on a SQLite instance (the local default).

A folder of ``BENCH_SHARDS`` (default 10,000) one-line JSONL shards; the sensor registers them at 1,000 per tick
(its cap), then ticks again in the steady state (10,000 files listed, nothing new); the nightly schedule computes
its run requests for every missing filter run; and an asset backfill of ``filtered_pool_shard`` over every
partition is submitted to the instance (what the UI's "Materialize all" does). The classifier's materialization is
reported as an event and its storage pointer written, so the sensor and schedule see a trained classifier;
nothing is filtered.
"""

from __future__ import annotations

import os
import tempfile
import time

from bench.run import Figure


def _write_pool(root: str, shards: int) -> None:
    os.makedirs(root, exist_ok=True)
    for i in range(shards):
        with open(os.path.join(root, f"shard-{i:06d}.jsonl"), "w", encoding="utf-8") as handle:
            handle.write('{"text": "one document"}\n')


def run(repeats: int = 1) -> list[Figure]:
    import dagster as dg
    from dagster._core.execution.backfill import PartitionBackfill

    from groupmates_assets.definitions import build_definitions
    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.pool import sensors
    from groupmates_assets.defs.resources import PlatformResource
    from groupmates_assets.lib import layout

    shards = int(os.environ.get("BENCH_SHARDS", "10000"))
    with tempfile.TemporaryDirectory(prefix="groupmates-bench-partitions-") as tmp:
        _write_pool(os.path.join(tmp, "pool"), shards)
        os.makedirs(os.path.join(tmp, "home"))
        platform = PlatformResource(storage_root=os.path.join(tmp, "store"), pool_dir=os.path.join(tmp, "pool"))
        with dg.instance_for_test(temp_dir=os.path.join(tmp, "home")) as instance:
            cursor, ticks, started = None, [], time.perf_counter()
            while True:
                tick_started = time.perf_counter()
                result = sensors.pool_shard_sensor(dg.build_sensor_context(
                    instance=instance, resources={"platform": platform}, cursor=cursor))
                for request in result.dynamic_partitions_requests or []:
                    instance.add_dynamic_partitions(pool_shards.name, list(request.partition_keys))
                ticks.append(time.perf_counter() - tick_started)
                if not result.dynamic_partitions_requests:
                    break
                cursor = result.cursor
            registration = time.perf_counter() - started
            assert len(instance.get_dynamic_partitions(pool_shards.name)) == shards
            instance.report_runless_asset_event(dg.AssetMaterialization("quality_classifier"))
            layout.write_pointer(platform.storage(), layout.CLASSIFIER_DIR, {"version": "bench"})  # the pointer
            steady = []
            for _ in range(max(1, repeats)):
                tick_started = time.perf_counter()
                result = sensors.pool_shard_sensor(dg.build_sensor_context(
                    instance=instance, resources={"platform": platform}, cursor=cursor))
                steady.append(time.perf_counter() - tick_started)
            runs_per_tick = len(result.run_requests)
            schedule_started = time.perf_counter()
            requests = sensors.missing_shard_runs(instance, limit=shards)
            schedule_seconds = time.perf_counter() - schedule_started
            graph = build_definitions().resolve_asset_graph()
            backfill_started = time.perf_counter()
            backfill = PartitionBackfill.from_asset_partitions(
                backfill_id="bench", asset_graph=graph, partition_names=instance.get_dynamic_partitions(
                    pool_shards.name), asset_selection=[dg.AssetKey("filtered_pool_shard")],
                backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance, all_partitions=False,
                title=None, description=None, run_config=None)
            instance.add_backfill(backfill)
            backfill_seconds = time.perf_counter() - backfill_started
            stored = instance.get_backfill("bench")
            assert stored is not None and stored.asset_backfill_data is not None
    return [
        Figure("partitions: shards", shards, "", "one-line JSONL files in a local folder; SQLite instance"),
        Figure("partitions: registration", round(registration, 2), "s",
               f"{len(ticks) - 1} sensor ticks at 1,000 new shards each, plus adding the partitions"),
        Figure("partitions: sensor tick, registering", round(max(ticks), 3), "s", "slowest registering tick"),
        Figure("partitions: sensor tick, steady state", round(min(steady), 3), "s",
               f"{shards:,} files listed, nothing new, {runs_per_tick} filter runs requested (cap)"),
        Figure("partitions: nightly schedule evaluation", round(schedule_seconds, 3), "s",
               f"{len(requests):,} run requests (one per unfiltered shard)"),
        Figure("partitions: asset backfill submission", round(backfill_seconds, 3), "s",
               f"filtered_pool_shard over {shards:,} partitions, stored in the instance"),
    ]
