"""Concurrent runs on PostgreSQL storage: runs/s and event-write latency, with nothing lost or duplicated.

A throwaway PostgreSQL server on loopback (groupmates_assets/testing/postgres_server.py) behind the compose
deployment's instance (docker/dagster.yaml, compute logs on local disk). ``BENCH_PG_WORKERS`` (default 4) OS
processes each materialize ``BENCH_PG_RUNS`` (default 20) partitions of the project's `pool_shard`, one run per
partition; workers pair up on the same partitions in the same order, so every partition is materialized twice, by
two processes at about the same moment. Then one worker alone does ``BENCH_PG_RUNS`` runs on a fresh database, for
comparison. Every scenario is reconciled against the database (groupmates_assets/testing/concurrent_runs.py): each
run succeeded, each worker's events are stored exactly once, each partition has its expected materializations.

The workers are released together once all have imported the project; runs/s is the runs over the wall-clock time
from that release to the last worker's exit. Event-write latency is each `store_event` call as the workers timed
it (insert, asset index rows, NOTIFY), under the concurrent load. One pass per scenario (``--repeats`` does not
apply: each pass is itself many runs).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.run import Figure


def _scenario(server, name: str, workers: int, runs_per_worker: int, tmp: Path) -> dict:
    from groupmates_assets.testing.concurrent_runs import (
        percentile,
        prepare_instance,
        reconcile,
        run_workers,
        write_pool,
    )
    from groupmates_assets.testing.postgres_server import create_database, write_compose_instance_home

    database = f"bench_{name}"
    create_database(server, database)
    groups = max(1, workers // 2)
    keys = [f"load-{g}-{i:04d}" for g in range(groups) for i in range(runs_per_worker)]
    write_pool(tmp / name / "pool", keys)
    assignments = [keys[(w % groups) * runs_per_worker:(w % groups + 1) * runs_per_worker] for w in range(workers)]
    expected: dict[str, int] = {}
    for assignment in assignments:
        for key in assignment:
            expected[key] = expected.get(key, 0) + 1
    home = write_compose_instance_home(tmp / name / "dagster_home")
    env = {**server.instance_env(database), "DAGSTER_HOME": str(home)}
    os.environ.update(env)
    assert prepare_instance(home, keys) == "PostgresEventLogStorage"
    reports, wall = run_workers(assignments, env=env, pool=tmp / name / "pool", storage_root=tmp / name / "store")
    connection = server.connect(database)
    try:
        problems = reconcile(connection, reports, expected)
    finally:
        connection.close()
    runs = [run for report in reports for run in report.runs]
    writes = [seconds for report in reports for seconds in report.write_seconds]
    durations = [run["end"] - run["start"] for run in runs]
    return {"workers": workers, "runs": len(runs), "partitions": len(expected), "wall": wall,
            "runs_per_s": len(runs) / wall, "events": len(writes), "events_per_s": len(writes) / wall,
            "write_p50": percentile(writes, 0.5), "write_p95": percentile(writes, 0.95), "write_max": max(writes),
            "run_p50": percentile(durations, 0.5), "problems": problems}


def run(repeats: int = 1) -> list[Figure]:
    from groupmates_assets.testing.postgres_server import PostgresUnavailable, postgres_server

    workers = int(os.environ.get("BENCH_PG_WORKERS", "4"))
    runs_per_worker = int(os.environ.get("BENCH_PG_RUNS", "20"))
    try:
        with tempfile.TemporaryDirectory(prefix="groupmates-bench-pg-") as tmp, postgres_server() as server:
            connects = []
            for _ in range(30):
                started = time.perf_counter()
                server.connect().close()
                connects.append(time.perf_counter() - started)
            concurrent = _scenario(server, "concurrent", workers, runs_per_worker, Path(tmp))
            alone = _scenario(server, "alone", 1, runs_per_worker, Path(tmp))
    except PostgresUnavailable as why:
        return [Figure("postgres runs: skipped", "skipped", "", str(why))]
    from groupmates_assets.testing.concurrent_runs import percentile

    figures = [Figure("postgres runs: new connection", round(percentile(connects, 0.5) * 1000, 2), "ms",
                      "psycopg2.connect + close, scram-sha-256 on loopback, p50 of 30, idle server: dagster-postgres "
                      "opens one per storage call (NullPool)")]
    for label, result in ((f"{workers} workers", concurrent), ("1 worker", alone)):
        held = "nothing lost or duplicated" if not result["problems"] else \
            f"{len(result['problems'])} problems, first: {result['problems'][0]}"
        figures += [
            Figure(f"postgres runs: {label}, runs/s", round(result["runs_per_s"], 2), "runs/s",
                   f"{result['runs']} runs of pool_shard over {result['partitions']} partitions in "
                   f"{result['wall']:.1f} s; {held}"),
            Figure(f"postgres runs: {label}, run duration p50", round(result["run_p50"], 3), "s",
                   "dg.materialize of one partition, in its worker"),
            Figure(f"postgres runs: {label}, event writes/s", round(result["events_per_s"], 1), "events/s",
                   f"{result['events']:,} events ({result['events'] / result['runs']:.0f} per run)"),
            Figure(f"postgres runs: {label}, event-write latency p50", round(result["write_p50"] * 1000, 2), "ms",
                   "one store_event call"),
            Figure(f"postgres runs: {label}, event-write latency p95", round(result["write_p95"] * 1000, 2), "ms",
                   f"max {result['write_max'] * 1000:.1f} ms"),
            Figure(f"postgres runs: {label}, discrepancies", len(result["problems"]), "",
                   "missing/extra/failed runs, lost or duplicated events, wrong materialization counts"),
        ]
    return figures
