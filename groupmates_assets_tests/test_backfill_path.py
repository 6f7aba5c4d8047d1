"""The backfill path the main job uses, on a small code location of the same shape (integration: a real daemon and
webserver on loopback): one backfill through GraphQL, a step retry absorbing a transient error, and a blocking
asset check that stops its downstream assets inside the backfill while the other shards go on."""

from __future__ import annotations

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
