"""The main job end to end, as `make demo` runs it, with the `ci` profile's tiny LM and few trajectories."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

METHODS = ("group_mates", "group_mates_weighted", "group_mates_global", "random", "mates", "fasttext")

# oracle_random's block-000 materialized again on the demo's instance and storage; prints its metadata as JSON.
RERUN_BLOCK = """
import json, sys
import dagster as dg
from groupmates_assets.defs.oracle.assets import oracle_random
from groupmates_assets.defs.resources import PlatformResource
with dg.DagsterInstance.from_config(sys.argv[1]) as instance:
    result = dg.materialize([oracle_random], partition_key="block-000", instance=instance,
                            resources={"platform": PlatformResource(storage_root=sys.argv[2])})
metadata = result.asset_materializations_for_node("oracle_random")[0].metadata
print(json.dumps({k: metadata[k].value for k in ("resumed_parts", "computed_trajectories", "trajectories")}))
"""


PROGRESS = re.compile(r"^\[groupmates\] +(\d+ s  [\w+]+: \d+ succeeded|slowest running: )")


def _interrupted_demo(env: dict[str, str], signum: int, stage: str) -> str:
    """The demo, sent ``signum`` once runs of the main backfill's ``stage`` are running; its output. It must end
    within 10 s of the signal, exit status 130, with one line (beside progress lines already on their way) and
    nothing it started left running."""
    demo = subprocess.Popen([sys.executable, "-m", "groupmates_assets.cli", "demo"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, after, sent, main = [], [], None, False
    for line in demo.stdout:
        (after if sent else lines).append(line)
        main = main or "follow it in the UI" in line or "resuming backfill" in line
        match = re.search(rf" {stage}: \d+ succeeded, (\d+) running", line)
        if main and sent is None and match and int(match.group(1)) > 0 and demo.poll() is None:
            demo.send_signal(signum)
            sent = time.monotonic()
    code = demo.wait(timeout=60)
    output = "".join(lines + after)
    assert sent is not None and code == 130, output[-3000:]
    took = time.monotonic() - sent
    assert took < 10, (took, output[-3000:])
    said = [line for line in after if not PROGRESS.match(line)]
    name = signal.Signals(signum).name
    assert len(said) == 1 and said[0].startswith(f"[groupmates] interrupted ({name}): backfill "), after
    assert "Traceback" not in output, output[-3000:]
    left = _processes_of(env["GROUPMATES_HOME"])
    assert not left, left  # no daemon, webserver, code server or run worker outlives the command
    return output


def _processes_of(home: str) -> list[str]:
    """Command lines of live processes started for the instance under ``home`` (their environment names it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"GROUPMATES_HOME={home}".encode() in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return found


def _service_logs(home: Path) -> dict[Path, int]:
    """The services' log files (daemon and webserver; the runs, their step and replica worker processes and the
    code servers write there too) and how long each is now."""
    return {log: log.stat().st_size for log in sorted((home / "dagster_home" / "service_logs").glob("*.log"))}


def _assert_no_traceback_since(sizes: dict[Path, int]) -> None:
    """Nothing written to a service log since ``sizes`` holds a traceback (such as a worker process's
    ``Process SpawnProcess-3: Traceback ... KeyboardInterrupt`` when the services stop) or one of Dagster's stack
    traces (a daemon reloading its workspace from a code server that has stopped warns with one)."""
    assert sizes, "no service logs"
    for log, size in sizes.items():
        with log.open("rb") as handle:
            handle.seek(size)
            written = handle.read().decode(errors="replace")
        assert not any(sign in written for sign in ("Traceback", "KeyboardInterrupt", "Stack Trace")), (
            log, written[-3000:])


def _assert_nothing_live(instance: dg.DagsterInstance) -> None:
    live = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
                                                     dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
                                                     dg.DagsterRunStatus.NOT_STARTED]))
    assert not live, [(r.run_id, r.status) for r in live]  # nothing left running or queued after the signal
    for pool in instance.event_log_storage.get_concurrency_keys():
        assert not instance.event_log_storage.get_concurrency_info(pool).claimed_slots, pool  # no slot kept


def _materializations(instance: dg.DagsterInstance) -> Counter:
    """How often each (asset, partition) was materialized."""
    counts: Counter = Counter()
    for key in instance.get_asset_keys():
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=10_000).records
        counts.update((key.to_user_string(), r.asset_materialization.partition) for r in records)
    return counts


def test_demo_runs_every_stage_through_a_persistent_instance(tmp_path):
    """One backfill through the daemon; SIGTERM while the quality stage runs and Ctrl-C during pool predictions each
    cancel it cleanly within 10 s, a rerun resumes it without redoing anything that succeeded, and a third run finds
    nothing to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_"))}
    env.update(GROUPMATES_HOME=str(tmp_path), GROUPMATES_PROFILE="ci", GROUPMATES_RETRY_DELAY_SECONDS="1")
    _interrupted_demo(env, signal.SIGTERM, r"\w+")  # the first stage with a run of the main backfill running
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    _assert_nothing_live(instance)
    interrupted = _interrupted_demo(env, signal.SIGINT, "selection")
    assert "backfill" in interrupted
    _assert_nothing_live(instance)
    retried = [r.run_id for r in instance.get_runs()
               if instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_RESTARTED)]
    assert not retried, retried  # a cancelled run's step stops; no retry attempt (deployment.stop_on_termination)
    before = _materializations(instance)
    assert before[("filtered_pool_summary", None)] == 1 and before[("selection_report", None)] == 0

    logs = _service_logs(tmp_path)
    run = subprocess.run([sys.executable, "-m", "groupmates_assets.cli", "demo"], env=env, capture_output=True,
                         text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "resuming backfill" in run.stdout and "Traceback" not in run.stdout + run.stderr
    _assert_no_traceback_since(logs)  # its runs, their worker processes and the services ended silently
    assert "oracle labels:" in run.stdout and "influence models" in run.stdout
    after = _materializations(instance)
    assert set(after) >= set(before) and all(count == 1 for count in after.values()), {
        k: c for k, c in after.items() if c != 1}  # nothing that succeeded before Ctrl-C ran again
    runs = instance.get_runs()
    assert runs and all("dagster/backfill" in r.tags for r in runs)  # every run came from a backfill

    logs = _service_logs(tmp_path)
    again = subprocess.run([sys.executable, "-m", "groupmates_assets.cli", "demo"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "already materialized every asset" in again.stdout, again.stdout[-3000:]
    assert "Traceback" not in again.stdout + again.stderr
    _assert_no_traceback_since(logs)
    assert len(instance.get_runs()) == len(runs)
    sensors = {state.name: state.status.value for state in instance.all_instigator_state()}
    assert sensors["pool_shard_sensor"] == "RUNNING"  # paused during the backfill, started again at the end

    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    for key in ("embedded_pool", "quality_classifier", "filtered_pool_summary", "probe_checkpoint",
                "reference_set", "probe_pool", "influence_model_init", "bootstrap_trajectories",
                "influence_model_final", "individual_influence_model", "influence_model_report"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    shards = instance.get_dynamic_partitions("pool_shards")
    assert len(shards) >= 8
    for key in ("filtered_pool_shard", "tokenized_pool_shard"):
        assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(shards), key
    assert instance.get_materialized_partitions(dg.AssetKey("oracle_random")) == {"block-000", "block-001"}
    assert instance.get_materialized_partitions(dg.AssetKey("oracle_bootstrap")) == {"block-000", "block-001"}

    summary = instance.get_latest_materialization_event(dg.AssetKey("filtered_pool_summary"))
    metadata = summary.asset_materialization.metadata
    assert metadata["rows_in"].value >= 20_000
    assert metadata["rows_in"].value == metadata["kept"].value + metadata["dropped"].value + metadata[
        "rejected"].value + metadata["heldout"].value
    assert metadata["heldout"].value >= 300  # the pool's held-out slice, about 2% of every source
    assert 0.3 < metadata["keep_rate"].value < 0.7  # the profile keeps about half
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key([
        dg.AssetCheckKey(dg.AssetKey("filtered_pool_summary"), "all_shards_reconcile"),
        dg.AssetCheckKey(dg.AssetKey("oracle_random"), "labels_consistent"),
        dg.AssetCheckKey(dg.AssetKey("oracle_bootstrap"), "labels_consistent"),
        dg.AssetCheckKey(dg.AssetKey("bootstrap_trajectories"), "tails_separated"),
    ])
    assert len(checks) == 4 and all(c.status.value == "SUCCEEDED" for c in checks.values())

    oracle_root = tmp_path / "storage" / "oracle" / "random"
    parts = sorted(oracle_root.glob("*/block-*/part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert sorted(r["trajectory_id"] for r in rows) == list(range(6))
    for row in rows:
        assert len(row["context_id"]) == 10 and len(set(row["context_id"])) == 10
        assert abs(sum(row["marginal"]) - (row["final_loss"] - row["base_loss"])) < 1e-4
    _check_influence_stage(tmp_path / "storage", instance)
    _check_selection_stage(tmp_path / "storage", instance, shards)
    _check_report_stage(tmp_path / "storage", instance, run.stdout)

    # A killed block reruns without duplicates: drop one part, rematerialize, get exactly that part back. In a
    # process of its own: the definitions' partitions come from the profile they are imported with (ci here).
    block_parts = sorted(oracle_root.glob("*/block-000/part-*.parquet"))
    original = pq.read_table(block_parts[-1])
    block_parts[-1].unlink()
    rerun = subprocess.run([sys.executable, "-c", RERUN_BLOCK, str(tmp_path / "dagster_home"),
                            str(tmp_path / "storage")], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metadata = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert metadata["resumed_parts"] == len(block_parts) - 1
    assert metadata["computed_trajectories"] == 1 and metadata["trajectories"] == 3
    assert pq.read_table(block_parts[-1]).equals(original)  # same plan, same labels (T9)


def _check_influence_stage(storage, instance) -> None:
    """Bootstrap beams come from both tails and were labelled; the final model saw both policies."""
    import json

    boot_rows = [r for p in sorted((storage / "oracle" / "bootstrap").glob("*/block-*/part-*.parquet"))
                 for r in pq.read_table(p).to_pylist()]
    assert sorted(r["policy"] for r in boot_rows) == ["bootstrap-beneficial"] * 2 + ["bootstrap-harmful"] * 2
    beams = pq.read_table(next((storage / "influence" / "bootstrap").glob("*/trajectories.parquet"))).to_pylist()
    assert {tuple(b["context_index"]) for b in beams} == {tuple(r["context_index"]) for r in boot_rows}
    final = json.loads((storage / "influence" / "models" / "final" / "current.json").read_text())
    assert set(final["oracle"]) == {"oracle_random", "oracle_bootstrap"}
    assert final["train_trajectories"] + final["val_trajectories"] == 10
    metadata = instance.get_latest_materialization_event(
        dg.AssetKey("influence_model_final")).asset_materialization.metadata
    assert metadata["relational"].value is True and metadata["train_trajectories"].value >= 6
    report = json.loads((storage / "influence" / "report.json").read_text())
    assert set(report) == {"init", "final", "individual", "learning_curves"}
    curves = report["learning_curves"]
    assert set(curves) == {"influence_model_final", "individual_influence_model"}
    for points in curves.values():  # ci: one subset, then the trained model itself (never retrained)
        assert [p["fraction"] for p in points] == [0.5, 1.0] and points[-1]["retrained"] is False
        assert points[0]["trajectories"] < points[-1]["trajectories"] == final["train_trajectories"]
    assert report["individual"]["alpha"] == 1.0 and report["individual"]["tau"] == 1.0


def _check_selection_stage(storage, instance, shards) -> None:
    """Every method selected the same number of documents; the corpora join back to the pool by doc_id."""
    import hashlib
    import io
    import json

    import zstandard

    for key in ("pool_predictions", "cluster_assignments", "selected_corpus"):
        assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(shards), key
    assert instance.get_materialized_partitions(dg.AssetKey("selected_documents")) == {
        "clusters-000-of-002", "clusters-001-of-002"}
    assert instance.get_materialized_partitions(dg.AssetKey("tokenized_corpus")) == set(METHODS)
    check_keys = [dg.AssetCheckKey(dg.AssetKey("selected_documents"), "budgets_exact"),
                  dg.AssetCheckKey(dg.AssetKey("selected_weighted"), "budgets_exact"),
                  dg.AssetCheckKey(dg.AssetKey("selected_global"), "budgets_exact"),
                  dg.AssetCheckKey(dg.AssetKey("selected_corpus"), "index_round_trip"),
                  dg.AssetCheckKey(dg.AssetKey("tokenized_corpus"), "every_document_every_pass")]
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    assert all(c.status.value == "SUCCEEDED" for c in checks.values())
    totals = {}
    for method in METHODS:
        ids = []
        for path in sorted((storage / "selected_corpus" / method).glob("*.jsonl.zst")):
            text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read().decode()
            for line in text.splitlines():
                record = json.loads(line)
                digest = hashlib.blake2b(record["text"].encode(), digest_size=8).hexdigest()
                assert record["doc_id"].endswith(digest) and record["selection"]["method"] == method
                ids.append(record["doc_id"])
        assert len(ids) == len(set(ids))
        totals[method] = len(ids)
    assert len(set(totals.values())) == 1 and totals["group_mates"] > 1000, totals
    centroids = instance.get_latest_materialization_event(dg.AssetKey("cluster_centroids"))
    assert centroids.asset_materialization.metadata["clusters"].value > 50


def _check_report_stage(storage, instance, stdout: str) -> None:
    """Pretraining (S = 2 from the probe checkpoint, 2 seeds), evaluation and the report close the loop."""
    import json

    for key in ("pretrain_checkpoints", "evaluation"):
        assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(METHODS), key
    probe_step = json.loads((storage / "lm" / "probe_checkpoint" / "trainer_state.json").read_text())["step"]
    for method in METHODS:
        runs = json.loads((storage / "pretrain" / method / "current.json").read_text())["runs"]
        assert len(runs) == 2
        for run in runs:
            curve = json.loads((storage / run["path"] / "curve.json").read_text())
            assert curve[0]["step"] == probe_step + 1 and curve[-1]["step"] == 10
    report = json.loads((storage / "report" / "report.json").read_text())
    assert set(report["methods"]) == set(METHODS)
    tokens = {m["tokens_seen"] for m in report["methods"].values()}
    assert tokens == {10 * 2 * 64}  # equal tokens for every method
    for figures in report["methods"].values():
        assert figures["seeds"] == 2 and figures["core_centered"]["std"] is not None
        assert len(figures["points"]) == 2  # checkpoints at steps 5 and 10
    components = {c["component"].split(" (")[0]: c["seconds"] for c in report["costs"]}
    assert all(seconds > 0 for seconds in components.values()), components
    assert 0 < report["overhead_share"] < 1
    assert (storage / "report" / "selection_report.md").exists()
    assert "| group_mates |" in stdout  # the headline table is printed
    markdown = (storage / "report" / "selection_report.md").read_text()
    assert "## The methods" in markdown and "## Composition of the selected corpora" in markdown
    assert report["composition"]["pool"]["documents"] == sum(report["composition"]["pool"]["by_source"].values())
    assert "minus mates [95% interval]" in markdown  # the causal check, against MATES too
    materialized = instance.get_latest_materialization_event(dg.AssetKey("selection_report"))
    assert "training_loss.png" in materialized.asset_materialization.metadata["report"].value
