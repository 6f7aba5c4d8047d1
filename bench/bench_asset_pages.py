"""The UI's asset pages at 10,000 dynamic shard partitions: the GraphQL queries behind them, timed in-process.

A SQLite instance (the local default; ``BENCH_PAGES_STORAGE=postgres``: the compose deployment's instance on a
throwaway PostgreSQL server) with ``BENCH_SHARDS`` (default 10,000) partitions of `pool_shards`;
``BENCH_MATERIALIZED`` (default 1,000) of `pool_shard`'s partitions and half as many of `filtered_pool_shard`'s
are recorded as materialized (runless materialization events, as an external tool reports them), plus a few real
runs of `pool_shard`, so pages show runs as well. The code location is the project's definitions loaded
in-process (`groupmates_assets.definitions:defs`); each query gets its own request context, as each HTTP request to
the webserver does, and runs through dagster-graphql's schema, which is what `dagster-webserver` serves, over an
instance set up as the webserver sets up its own (`optimize_for_webserver` with its defaults).

The queries are the webserver's own (dagster-webserver 1.13's bundle: `PartitionHealthQuery`,
`AssetGraphLiveQuery`, `AssetViewDefinitionQuery`, ...) with the display-only parts of their fragments trimmed
(metadata entry bodies, lineage); every field that reads partitions or events is kept. Each figure is the best of
``--repeats``; the partition-status query is also timed once on a cold status cache (the first visit after the
materializations). The backfill mutation is what "Materialize all" submits: every partition named.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.run import Figure

REPO = Path(__file__).resolve().parents[1]
EVENT_TYPES = ["MATERIALIZATION", "OBSERVATION", "FAILED_TO_MATERIALIZE"]

# The asset graph, the catalog and the lineage tab: live data for every node (one request for all here).
ASSET_GRAPH_LIVE = """
query AssetGraphLiveQuery($assetKeys: [AssetKeyInput!]!) {
  assetNodes(assetKeys: $assetKeys, loadMaterializations: true) {
    id opNames repository { id } assetKey { path }
    assetMaterializations(limit: 1) { timestamp runId stepKey }
    assetObservations(limit: 1) { timestamp runId stepKey }
    assetChecksOrError { ... on AssetChecks { checks { name canExecuteIndividually
      executionForLatestMaterialization { id runId status timestamp stepKey evaluation { severity } } } } }
    partitionStats { numMaterialized numMaterializing numPartitions numFailed }
  }
  assetsLatestInfo(assetKeys: $assetKeys) {
    id assetKey { path } unstartedRunIds inProgressRunIds latestRun { id status startTime endTime }
  }
}
"""

# The asset page's header and definition tab.
ASSET_VIEW_DEFINITION = """
query AssetViewDefinitionQuery($assetKey: AssetKeyInput!) {
  assetOrError(assetKey: $assetKey) {
    ... on Asset {
      id key { path } hasDefinitionOrRecord
      assetMaterializations(limit: 1) { timestamp runId }
      definition {
        id pools opVersion groupName isExecutable description
        partitionDefinition { description dimensionTypes { type dynamicPartitionsDefinitionName } }
        partitionKeysByDimension { name }
        backfillPolicy { description }
        dependencyKeys { path } dependedByKeys { path }
      }
    }
  }
}
"""

# The partition health bar (overview) and the Partitions tab: every key and the materialized/failed ones.
PARTITION_HEALTH = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
        ... on MultiPartitionStatuses {
          primaryDimensionName
          ranges {
            primaryDimStartKey primaryDimEndKey primaryDimStartTime primaryDimEndTime
            secondaryDim {
              ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
              ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
            }
          }
        }
      }
    }
  }
}
"""

# The overview's latest partitions and their latest materializations.
LATEST_PARTITIONS = """
query LatestAssetPartitionsQuery($assetKey: AssetKeyInput!, $limit: Int!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode { id partitionKeyConnection(limit: $limit, ascending: false) { results } }
  }
}
"""
PARTITION_EVENTS = """
query AssetPartitionEventsQuery($assetKey: AssetKeyInput!, $partitions: [String!]!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      latestMaterializationByPartition(partitions: $partitions) {
        partition runId timestamp stepKey label description tags { key value } metadataEntries { label }
      }
    }
  }
}
"""

# The Events tab.
RECENT_EVENTS = """
query RecentAssetEventsQuery($assetKey: AssetKeyInput!, $eventTypeSelectors: [AssetEventHistoryEventTypeSelector!]!,
                             $limit: Int!, $partitions: [String!]) {
  assetsLatestInfo(assetKeys: [$assetKey]) {
    id assetKey { path } unstartedRunIds inProgressRunIds latestRun { id status startTime endTime }
  }
  assetOrError(assetKey: $assetKey) {
    ... on Asset {
      id key { path }
      assetEventHistory(limit: $limit, eventTypeSelectors: $eventTypeSelectors, partitions: $partitions) {
        results {
          ... on MaterializationEvent { partition runId timestamp stepKey metadataEntries { label } }
          ... on FailedToMaterializeEvent { partition runId timestamp }
          ... on ObservationEvent { partition runId timestamp }
        }
        cursor
      }
    }
  }
}
"""

# One partition selected in the Partitions tab.
PARTITION_DETAIL = """
query AssetPartitionDetailQuery($assetKey: AssetKeyInput!, $partitionKey: String!) {
  assetOrError(assetKey: $assetKey) {
    ... on Asset {
      id
      definition { id opNames latestRunForPartition(partition: $partitionKey) { id status endTime } }
      assetEventHistory(partitions: [$partitionKey], limit: 1000,
                        eventTypeSelectors: [MATERIALIZATION, OBSERVATION, FAILED_TO_MATERIALIZE]) {
        results {
          ... on MaterializationEvent { runId partition timestamp }
          ... on ObservationEvent { runId partition timestamp }
          ... on FailedToMaterializeEvent { runId partition timestamp }
        }
      }
    }
  }
}
"""
PARTITION_STALE = """
query AssetPartitionStaleQuery($assetKey: AssetKeyInput!, $partitionKey: String!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id staleStatus(partition: $partitionKey)
      staleCauses(partition: $partitionKey) { key { path } reason category dependency { path } }
    }
  }
}
"""

# "Materialize all" (or a range) from the asset page: the backfill is stored; the daemon launches its runs.
LAUNCH_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""


def shard_keys(count: int) -> list[str]:
    return [f"shard-{i:06d}" for i in range(count)]


def asset_key(name: str) -> dict[str, list[str]]:
    return {"path": [name]}


class AssetPages:
    """The project's code location, in-process, over ``instance``: `query` runs one GraphQL request.

    The instance is set up as `dagster-webserver` sets up its own, with its default settings: on PostgreSQL that
    holds a connection pool open and gives every statement 15 s (past that, the UI shows an error)."""

    def __init__(self, instance) -> None:
        from dagster._core.remote_origin import InProcessCodeLocationOrigin
        from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
        from dagster_webserver.cli import DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_MAX_OVERFLOW, DEFAULT_POOL_RECYCLE

        instance.optimize_for_webserver(DEFAULT_DB_STATEMENT_TIMEOUT, DEFAULT_POOL_RECYCLE, DEFAULT_POOL_MAX_OVERFLOW)

        origin = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name="groupmates_assets.definitions", attribute="defs",
                                 working_directory=str(REPO)),
            location_name="groupmates_assets")
        self._process = WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin))

    def __enter__(self) -> AssetPages:
        self._process.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._process.__exit__(*exc)

    def all_asset_keys(self) -> list[dict[str, list[str]]]:
        data = self.query("{ assetNodes { assetKey { path } } }")
        return [{"path": node["assetKey"]["path"]} for node in data["assetNodes"]]

    def query(self, text: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One request, as the webserver serves it (a fresh request context); raises on any GraphQL error."""
        from dagster_graphql.test.utils import execute_dagster_graphql

        result = execute_dagster_graphql(self._process.create_request_context(), text, dict(variables or {}))
        return result.data


def record_materializations(instance, keys: list[str], asset: str) -> None:
    """Runless materializations (as `report_runless_asset_event`, or the REST API, records them)."""
    import dagster as dg

    for key in keys:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=key,
                                                                    metadata={"bench": "asset_pages"}))


def _best(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def _instance(stack: contextlib.ExitStack, storage: str, tmp: Path):
    """A SQLite test instance, or the compose deployment's on a throwaway PostgreSQL server."""
    import dagster as dg

    if storage == "sqlite":
        (tmp / "home").mkdir()
        return dg.instance_for_test(temp_dir=str(tmp / "home"))
    from groupmates_assets.testing.postgres_server import create_database, postgres_server, write_compose_instance_home

    server = stack.enter_context(postgres_server())
    create_database(server, "bench_asset_pages")
    os.environ.update(server.instance_env("bench_asset_pages"))
    return dg.DagsterInstance.from_config(str(write_compose_instance_home(tmp / "home")))


def run(repeats: int = 3) -> list[Figure]:
    shards = int(os.environ.get("BENCH_SHARDS", "10000"))
    materialized = min(shards, int(os.environ.get("BENCH_MATERIALIZED", "1000")))
    storage = os.environ.get("BENCH_PAGES_STORAGE", "sqlite")
    if storage not in ("sqlite", "postgres"):
        raise SystemExit(f"BENCH_PAGES_STORAGE must be sqlite or postgres, not {storage!r}")
    real_runs = 3
    with tempfile.TemporaryDirectory(prefix="groupmates-bench-pages-") as tmp:
        os.environ["GROUPMATES_STORAGE_ROOT"] = os.path.join(tmp, "store")  # read when the definitions load
        os.environ["GROUPMATES_POOL_DIR"] = os.path.join(tmp, "pool")
        os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
        import dagster as dg

        from groupmates_assets.defs.partitions import pool_shards
        from groupmates_assets.defs.pool.assets import pool_shard
        from groupmates_assets.defs.resources import PlatformResource

        keys = shard_keys(shards)
        os.makedirs(os.path.join(tmp, "pool"))
        for key in keys[:real_runs]:
            with open(os.path.join(tmp, "pool", f"{key}.jsonl"), "w", encoding="utf-8") as handle:
                handle.write('{"text": "one document"}\n')
        with contextlib.ExitStack() as stack:
            instance = stack.enter_context(_instance(stack, storage, Path(tmp)))
            started = time.perf_counter()
            instance.add_dynamic_partitions(pool_shards.name, keys)
            add_seconds = time.perf_counter() - started
            platform = PlatformResource(storage_root=os.path.join(tmp, "store"), pool_dir=os.path.join(tmp, "pool"))
            run_ids = [dg.materialize([pool_shard], partition_key=key, instance=instance,
                                      resources={"platform": platform}).run_id for key in keys[:real_runs]]
            started = time.perf_counter()
            record_materializations(instance, keys[real_runs:materialized], "pool_shard")
            record_materializations(instance, keys[: materialized // 2], "filtered_pool_shard")
            record_seconds = time.perf_counter() - started
            recorded = materialized - real_runs + materialized // 2

            started = time.perf_counter()
            with AssetPages(instance) as pages:
                all_keys = pages.all_asset_keys()
                load_seconds = time.perf_counter() - started
                pool, filtered = asset_key("pool_shard"), asset_key("filtered_pool_shard")

                def health(key=pool):
                    node = pages.query(PARTITION_HEALTH, {"assetKey": key})["assetNodeOrError"]
                    return len(node["partitionKeysByDimension"][0]["partitionKeys"]), len(
                        node["assetPartitionStatuses"]["materializedPartitions"])

                cold_started = time.perf_counter()
                cold = health()
                cold_seconds = time.perf_counter() - cold_started
                assert cold == (shards, materialized), cold
                health_seconds, _ = _best(repeats, health)
                health(filtered)

                def graph():
                    nodes = pages.query(ASSET_GRAPH_LIVE, {"assetKeys": all_keys})["assetNodes"]
                    return {n["assetKey"]["path"][0]: n["partitionStats"] for n in nodes}

                graph_seconds, stats = _best(repeats, graph)
                assert stats["pool_shard"] == {"numMaterialized": materialized, "numMaterializing": 0,
                                               "numPartitions": shards, "numFailed": 0}, stats["pool_shard"]
                assert stats["filtered_pool_shard"]["numMaterialized"] == materialized // 2
                partitioned = sum(1 for s in stats.values() if s and s["numPartitions"] == shards)

                definition_seconds, definition = _best(repeats, lambda: pages.query(
                    ASSET_VIEW_DEFINITION, {"assetKey": pool})["assetOrError"]["definition"])
                assert definition["partitionDefinition"]["dimensionTypes"][0]["dynamicPartitionsDefinitionName"] \
                    == pool_shards.name
                latest_seconds, latest = _best(repeats, lambda: pages.query(
                    LATEST_PARTITIONS, {"assetKey": pool, "limit": 100}
                )["assetNodeOrError"]["partitionKeyConnection"]["results"])
                assert latest == keys[::-1][:100]
                page = keys[:100]  # a page of partitions, some with a run, most materialized, none missing here
                events_seconds, events = _best(repeats, lambda: pages.query(
                    PARTITION_EVENTS, {"assetKey": pool, "partitions": page}
                )["assetNodeOrError"]["latestMaterializationByPartition"])
                assert [e["partition"] for e in events if e] == page
                recent_seconds, recent = _best(repeats, lambda: pages.query(
                    RECENT_EVENTS, {"assetKey": pool, "eventTypeSelectors": EVENT_TYPES, "limit": 100}
                )["assetOrError"]["assetEventHistory"]["results"])
                assert len(recent) == 100
                detail_seconds, detail = _best(repeats, lambda: pages.query(
                    PARTITION_DETAIL, {"assetKey": pool, "partitionKey": keys[0]})["assetOrError"])
                assert detail["definition"]["latestRunForPartition"]["id"] == run_ids[0]
                stale_seconds, _ = _best(repeats, lambda: pages.query(
                    PARTITION_STALE, {"assetKey": filtered, "partitionKey": keys[0]}))

                def launch():
                    result = pages.query(LAUNCH_BACKFILL, {"backfillParams": {
                        "partitionNames": keys, "assetSelection": [filtered]}})["launchPartitionBackfill"]
                    assert result["__typename"] == "LaunchBackfillSuccess", result
                    return result["backfillId"]

                backfill_seconds, backfill_id = _best(repeats, launch)
                backfill = instance.get_backfill(backfill_id)
                assert backfill is not None and backfill.asset_backfill_data is not None
                assert backfill.asset_backfill_data.target_subset.num_partitions_and_non_partitioned_assets == shards

    where = f"{shards:,} partitions, {materialized:,} materialized"
    return [
        Figure("asset pages: shards", shards, "",
               f"{ {'sqlite': 'SQLite', 'postgres': 'PostgreSQL'}[storage]} instance; pool_shard: "
               f"{materialized:,} materialized ({real_runs} by runs), filtered_pool_shard: {materialized // 2:,}"),
        Figure("asset pages: add partitions", round(add_seconds, 3), "s",
               f"instance.add_dynamic_partitions of {shards:,} keys at once"),
        Figure("asset pages: record materializations", round(record_seconds, 2), "s",
               f"{recorded:,} runless materialization events ({recorded / record_seconds:,.0f}/s)"),
        Figure("asset pages: load code location", round(load_seconds, 2), "s",
               "project definitions in-process, then the first query (every asset key)"),
        Figure("asset pages: partition health, cold cache", round(cold_seconds, 3), "s",
               f"PartitionHealthQuery on pool_shard, first visit: {where}"),
        Figure("asset pages: partition health", round(health_seconds, 3), "s",
               f"PartitionHealthQuery on pool_shard (health bar, Partitions tab): {where}"),
        Figure("asset pages: asset graph live data", round(graph_seconds, 3), "s",
               f"AssetGraphLiveQuery over all {len(all_keys)} assets ({partitioned} over {shards:,} shards): "
               "partition stats, latest events, checks"),
        Figure("asset pages: definition", round(definition_seconds, 3), "s", "AssetViewDefinitionQuery, pool_shard"),
        Figure("asset pages: latest partitions", round(latest_seconds, 3), "s",
               "LatestAssetPartitionsQuery, the last 100 keys of pool_shard"),
        Figure("asset pages: latest materialization of 100 partitions", round(events_seconds, 3), "s",
               "AssetPartitionEventsQuery, pool_shard"),
        Figure("asset pages: events tab", round(recent_seconds, 3), "s",
               "RecentAssetEventsQuery, the 100 latest events of pool_shard"),
        Figure("asset pages: one partition", round(detail_seconds, 3), "s",
               "AssetPartitionDetailQuery (latest run, event history), pool_shard"),
        Figure("asset pages: one partition's staleness", round(stale_seconds, 3), "s",
               "AssetPartitionStaleQuery, filtered_pool_shard"),
        Figure("asset pages: launch backfill of every partition", round(backfill_seconds, 3), "s",
               f"LaunchPartitionBackfill mutation, filtered_pool_shard, {shards:,} partition names"),
    ]
