"""The backfill path the main job uses, on a small code location of the same shape (integration: a real daemon and
webserver on loopback): one backfill through GraphQL, a step retry absorbing a transient error, and a blocking
asset check that stops its downstream assets inside the backfill while the other shards go on; and what the daemon's
run monitoring does with the pool slot of a run whose process was killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from groupmates_assets import local_dagster as services
from groupmates_assets.cli import REPO_DAGSTER_YAML

pytestmark = pytest.mark.integration

PROBE = Path(__file__).resolve().parent / "backfill_probe"


def _home(tmp_path: Path) -> Path:
    """An instance with the project's settings, less its code location (the probe's workspace replaces it)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load(REPO_DAGSTER_YAML.read_text())
    config.pop("load_from", None)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def _wait(dagster: services.LocalDagster, backfill_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = services.backfill_state(dagster, backfill_id)
        if state["status"] in services.TERMINAL:
            return state
        time.sleep(2)
    raise AssertionError(f"backfill {backfill_id} still running after {timeout} s")


def test_blocking_check_stops_downstream_inside_a_backfill_and_retries_absorb_a_transient_error(
        tmp_path, monkeypatch):
    home = _home(tmp_path)
    log = tmp_path / "materialized.txt"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("probe_shards", ["a", "b", "c"])
    env = {"PROBE_LOG": str(log), "PROBE_BAD_SHARD": "b"}
    with services.LocalDagster(str(home), env=env, workspace=PROBE / "workspace.yaml") as dagster:
        keys = sorted(n["key"] for n in services.asset_nodes(dagster))
        assert keys == ["probe_filtered", "probe_scored", "probe_summary"]
        backfill_id = services.launch_backfill(dagster, keys, "probe", {"groupmates/demo": "main"})
        state = _wait(dagster, backfill_id)
        assert state["tags"]["groupmates/demo"] == "main"
        assert any(b["id"] == backfill_id for b in services.recent_backfills(dagster))
        code_servers = {name: [c for c in commands if " api grpc " in f" {c} "]
                        for name, commands in dagster.service_processes().items()}
        assert not code_servers["daemon"] and not code_servers["webserver"], code_servers  # none of their own
        assert len(code_servers["code_server_backfill_probe"]) == 1, code_servers  # the one both load from
    assert state["status"] == "COMPLETED_FAILED"
    # every shard's first attempt raised OSError; the retry policy ran it again and it succeeded
    done = sorted(log.read_text().splitlines())
    assert done == ["probe_filtered a", "probe_filtered b", "probe_filtered c", "probe_scored a", "probe_scored c"]
    assert state["assets"]["probe_scored"] == {"targeted": 3, "materialized": 2, "failed": 1, "in_progress": 0}
    assert state["assets"]["probe_summary"]["materialized"] == 0  # needs every shard: stopped by b's check
    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    assert runs and all(r.tags.get("groupmates/demo") == "main" for r in runs)
    restarts = sum(len(instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_RESTARTED)) for r in runs)
    assert restarts == 3  # one retry per shard, none for the downstream steps

    # The cause fixed, a re-execution from failure runs only what the first backfill did not materialize.
    log.write_text("")
    env["PROBE_BAD_SHARD"] = ""
    with services.LocalDagster(str(home), env=env, workspace=PROBE / "workspace.yaml") as dagster:
        resumed = services.resume_backfill(dagster, backfill_id)
        state = _wait(dagster, resumed)
    assert state["status"] == "COMPLETED_SUCCESS"
    assert state["tags"]["groupmates/demo"] == "main"  # the re-execution keeps the tags the demo looks for
    assert sorted(log.read_text().splitlines()) == ["probe_scored b", "probe_summary -"]


def _launch_run(dagster: services.LocalDagster, job: str) -> str:
    """Launch a job of the probe location through GraphQL (the UI's Launch Run); its run id."""
    data = dagster.graphql("""mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
        ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
        ... on RunConfigValidationInvalid { errors { message } } } }""",
                           {"p": {"selector": {"repositoryLocationName": "backfill_probe",
                                               "repositoryName": "__repository__", "jobName": job},
                                  "runConfigData": {}}})
    assert data["launchRun"]["__typename"] == "LaunchRunSuccess", data
    return data["launchRun"]["run"]["runId"]


def _until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout:.0f} s")


def test_the_daemon_fails_a_killed_run_and_frees_its_pool_slot(tmp_path, monkeypatch):
    """A run launched by the daemon holds the only ``gpu`` slot; its process is SIGKILLed (no clean-up runs). Run
    monitoring (the project's dagster.yaml, with its intervals shortened) marks the run failed and frees the slot, and
    the daemon's run retry then gets the slot and succeeds. With monitoring off the killed run would stay STARTED
    holding the slot, and the retry would never run."""
    home = _home(tmp_path)
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=2)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    pids = tmp_path / "holder-pids"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    env = {"PROBE_LOG": str(tmp_path / "materialized.txt")}
    with services.LocalDagster(str(home), env=env, workspace=PROBE / "workspace.yaml") as dagster:
        services.set_pool_limit(dagster, "gpu", 1)
        run_id = _launch_run(dagster, "gpu_holder_job")
        _until(lambda: pids.exists() and pids.read_text().strip(), 120, "the holder step started")
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == 1 and [s.run_id for s in info.claimed_slots] == [run_id]
        os.kill(int(pids.read_text().split()[0]), signal.SIGKILL)

        failed = _until(lambda: (r := instance.get_run_by_id(run_id)) and r.status == dg.DagsterRunStatus.FAILURE
                        and r, 60, "the killed run marked failed")
        assert failed.status == dg.DagsterRunStatus.FAILURE
        retry = _until(lambda: next((r for r in instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
                                     if r.status == dg.DagsterRunStatus.SUCCESS), None), 120,
                       "the run retry succeeded with the freed slot")
        assert (tmp_path / "materialized.txt").read_text().split() == ["hold_gpu_slot", "-"]
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert retry.tags.get("dagster/retry_number") == "1"
