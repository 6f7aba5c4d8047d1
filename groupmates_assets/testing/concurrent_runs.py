"""Concurrent runs against one Dagster instance on PostgreSQL storage: the worker processes and the reconciliation.

Each worker is its own OS process (``python -m groupmates_assets.testing.concurrent_runs``) that opens the instance in
$DAGSTER_HOME, waits at a barrier until every worker has imported Dagster and the project, then materializes the
project's `pool_shard` asset for each partition key it was given, one run per partition (as the asset's
`BackfillPolicy.multi_run(1)` launches them). It wraps the event log storage's `store_event`, so it knows how many
events it wrote for each run and how long each write took, and prints that as one JSON line.

`reconcile` then reads the database directly (not through Dagster's caches) and returns every discrepancy: a run
that is missing, extra or not successful; a run whose stored events differ in number from what its worker wrote
(lost or duplicated events); a run without exactly one start, one success and one materialization; a partition
whose materialization count is not the expected one; duplicated event rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ASSET = "pool_shard"
BARRIER_TIMEOUT_S = 300.0


@dataclass
class WorkerReport:
    """What one worker process did, as it saw it."""

    name: str
    runs: list[dict[str, Any]]  # run_id, partition, success, start, end (epoch seconds)
    events_by_run: dict[str, int]  # events this process stored, by run id
    write_seconds: list[float] = field(default_factory=list)  # each event write, in order

    @property
    def run_ids(self) -> list[str]:
        return [run["run_id"] for run in self.runs]


def write_pool(pool: Path, keys: Sequence[str], documents: int = 3) -> None:
    """One small JSONL shard per partition key (the key is the file's stem)."""
    pool.mkdir(parents=True, exist_ok=True)
    for key in keys:
        lines = "".join(json.dumps({"text": f"document {i} of shard {key}", "url": f"doc://{key}/{i}"}) + "\n"
                        for i in range(documents))
        (pool / f"{key}.jsonl").write_text(lines, encoding="utf-8")


def prepare_instance(home: Path, keys: Sequence[str]) -> str:
    """Open the instance in ``home`` once (creating its schema, as the webserver and daemon do before any run) and
    register ``keys`` as `pool_shards` partitions, as the shard sensor does; returns the event storage's class name.
    The instance's variables (DAGSTER_PG_*) must be in the environment."""
    import dagster as dg

    from groupmates_assets.defs.partitions import pool_shards

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(pool_shards.name, list(keys))
        return type(instance.event_log_storage).__name__


def run_workers(assignments: Sequence[Sequence[str]], *, env: Mapping[str, str], pool: Path, storage_root: Path,
                timeout_s: float = 600.0) -> tuple[list[WorkerReport], float]:
    """Start one process per list of partition keys, release them together, wait for all; returns their reports
    and the wall-clock seconds from the release to the last one's exit. Raises with the worker's log on failure."""
    with tempfile.TemporaryDirectory(prefix="gm-workers-") as tmp:
        barrier = Path(tmp)
        go = barrier / "go"
        child_env = {**os.environ, **env, "DAGSTER_DISABLE_TELEMETRY": "1",
                     "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        workers = []
        for index, keys in enumerate(assignments):
            name = f"worker-{index}"
            log = open(barrier / f"{name}.log", "wb")  # noqa: SIM115 (closed below, after the process ends)
            command = [sys.executable, "-m", "groupmates_assets.testing.concurrent_runs", "--name", name,
                       "--pool", str(pool), "--storage-root", str(storage_root), "--ready", str(barrier / name),
                       "--go", str(go), *keys]
            process = subprocess.Popen(command, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=log,
                                       stdin=subprocess.DEVNULL)
            workers.append((name, process, log))
        try:
            deadline = time.monotonic() + BARRIER_TIMEOUT_S
            while not all((barrier / name).exists() for name, _, _ in workers):
                for name, process, _ in workers:
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited with {process.returncode} before the barrier:\n"
                                           f"{_tail(barrier / f'{name}.log')}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers did not reach the barrier in time")
                time.sleep(0.05)
            released = time.monotonic()
            go.touch()
            reports = []
            for name, process, _ in workers:
                out, _ = process.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - released)))
                if process.returncode != 0:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{_tail(barrier / f'{name}.log')}")
                reports.append(WorkerReport(**json.loads(out.decode().strip().splitlines()[-1])))
            return reports, time.monotonic() - released
        finally:
            for _, process, log in workers:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                log.close()


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


def reconcile(connection, reports: Sequence[WorkerReport], expected_per_partition: Mapping[str, int]) -> list[str]:
    """Every discrepancy between what the workers did and what the database holds (empty: nothing lost)."""
    from dagster import AssetKey, DagsterEventType

    problems: list[str] = []
    asset_key = AssetKey(ASSET).to_string()
    written = {run_id: count for report in reports for run_id, count in report.events_by_run.items()}
    reported_runs = {run["run_id"]: run for report in reports for run in report.runs}
    if len(reported_runs) != sum(len(report.runs) for report in reports):
        problems.append("two workers reported the same run id")
    for run in reported_runs.values():
        if not run["success"]:
            problems.append(f"run {run['run_id']} ({run['partition']}) did not succeed in its worker")
    with connection.cursor() as cursor:
        cursor.execute("SELECT run_id, status FROM runs")
        stored_runs = dict(cursor.fetchall())
        for run_id in reported_runs.keys() - stored_runs.keys():
            problems.append(f"run {run_id} is missing from the runs table")
        for run_id in stored_runs.keys() - reported_runs.keys():
            problems.append(f"run {run_id} in the runs table was not started by a worker")
        for run_id, status in stored_runs.items():
            if status != "SUCCESS":
                problems.append(f"run {run_id} is stored as {status}")

        cursor.execute("SELECT run_id, count(*) FROM event_logs GROUP BY run_id")
        stored_events = dict(cursor.fetchall())
        for run_id in written.keys() | stored_events.keys():
            if written.get(run_id, 0) != stored_events.get(run_id, 0):
                problems.append(f"run {run_id}: its worker wrote {written.get(run_id, 0)} events, the event log "
                                f"holds {stored_events.get(run_id, 0)}")

        once = (DagsterEventType.RUN_START, DagsterEventType.RUN_SUCCESS, DagsterEventType.ASSET_MATERIALIZATION)
        cursor.execute("SELECT run_id, dagster_event_type, count(*) FROM event_logs WHERE dagster_event_type IN "
                       "%s GROUP BY run_id, dagster_event_type", (tuple(t.value for t in once),))
        per_run: dict[str, Counter] = {run_id: Counter() for run_id in reported_runs}
        for run_id, event_type, count in cursor.fetchall():
            per_run.setdefault(run_id, Counter())[DagsterEventType(event_type).name] = count
        for run_id, counts in per_run.items():
            if counts != Counter({t.name: 1 for t in once}):
                problems.append(f"run {run_id}: {dict(counts)} (want one start, one success, one materialization)")

        cursor.execute("SELECT run_id, partition FROM event_logs WHERE dagster_event_type = %s AND asset_key = %s",
                       (DagsterEventType.ASSET_MATERIALIZATION.value, asset_key))
        materializations = cursor.fetchall()
        for run_id, partition in materializations:
            run = reported_runs.get(run_id)
            if run is not None and run["partition"] != partition:
                problems.append(f"run {run_id} was for {run['partition']} but materialized {partition}")
        by_partition = Counter(partition for _, partition in materializations)
        for partition in expected_per_partition.keys() | by_partition.keys():
            if by_partition.get(partition, 0) != expected_per_partition.get(partition, 0):
                problems.append(f"{ASSET}[{partition}]: {by_partition.get(partition, 0)} materializations, "
                                f"want {expected_per_partition.get(partition, 0)}")

        cursor.execute("SELECT count(*) FROM (SELECT event FROM event_logs GROUP BY event HAVING count(*) > 1) AS d")
        (duplicated,) = cursor.fetchone()
        if duplicated:
            problems.append(f"{duplicated} events are stored more than once")
    return problems


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


# --- the worker process ------------------------------------------------------------------------------------------


def _worker(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupmates_assets.testing.concurrent_runs")
    parser.add_argument("--name", required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--storage-root", required=True)
    parser.add_argument("--ready", required=True, help="file to create once Dagster and the project are loaded")
    parser.add_argument("--go", required=True, help="file whose appearance releases the worker")
    parser.add_argument("keys", nargs="+", help="pool_shard partition keys, one run each")
    args = parser.parse_args(argv)

    import dagster as dg

    from groupmates_assets.defs.pool.assets import pool_shard
    from groupmates_assets.defs.resources import PlatformResource

    platform = PlatformResource(storage_root=args.storage_root, pool_dir=args.pool)
    events_by_run: Counter = Counter()
    write_seconds: list[float] = []
    runs = []
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        store_event = storage.store_event

        def timed_store_event(event) -> None:
            started = time.perf_counter()
            store_event(event)
            write_seconds.append(time.perf_counter() - started)
            events_by_run[event.run_id] += 1

        storage.store_event = timed_store_event  # the instance writes every event of a run through this
        Path(args.ready).touch()
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while not os.path.exists(args.go):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.02)
        for key in args.keys:
            started = time.time()
            result = dg.materialize([pool_shard], partition_key=key, instance=instance,
                                    resources={"platform": platform}, tags={"groupmates/load": args.name},
                                    raise_on_error=False)
            runs.append({"run_id": result.run_id, "partition": key, "success": result.success, "start": started,
                         "end": time.time()})
    print(json.dumps({"name": args.name, "runs": runs, "events_by_run": dict(events_by_run),
                      "write_seconds": write_seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
