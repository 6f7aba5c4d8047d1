"""Retries: a step that hits a transient error (storage, memory) runs again and ends as a run without the error
would; a step that fails on bad input (``PermanentFailure``) fails at once; a run whose process died is relaunched
by the daemon (dagster.yaml run_retries) while a run whose steps failed is not."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from groupmates_assets.defs import deployment
from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.deployment import STEP_RETRY
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.pool.assets import pool_shard
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import failpoints

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
RETRY, RESTART = dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_RESTARTED


def _events(result, kind: dg.DagsterEventType) -> list:
    return [e for e in result.all_events if e.event_type == kind]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_pool_shard(root: Path, pool: Path, key: str, raise_on_error: bool = True):
    (root / "dagster").mkdir(parents=True)
    platform = PlatformResource(storage_root=str(root / "store"), pool_dir=str(pool))
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        instance.add_dynamic_partitions(pool_shards.name, [key])
        return dg.materialize([pool_shard], partition_key=key, instance=instance, resources={"platform": platform},
                              raise_on_error=raise_on_error)


def test_every_asset_retries_under_the_step_policy():
    from groupmates_assets.definitions import defs

    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    assert len(assets) >= 25
    missing = sorted(a.key.to_user_string() for a in assets if a.op.retry_policy is not STEP_RETRY)
    assert not missing, f"assets without STEP_RETRY: {missing}"
    assert isinstance(STEP_RETRY, dg.RetryPolicy) and STEP_RETRY.max_retries == 2
    assert STEP_RETRY.backoff is dg.Backoff.EXPONENTIAL and STEP_RETRY.jitter is dg.Jitter.PLUS_MINUS
    not_stopping = sorted(a.key.to_user_string() for a in assets
                          if not getattr(a.op.compute_fn.decorated_fn, "stops_on_termination", False))
    assert not not_stopping, f"assets a terminated run would retry: {not_stopping}"
    assert STEP_RETRY.delay == 0.1  # GROUPMATES_RETRY_DELAY_SECONDS from conftest
    assert all(0 <= STEP_RETRY.calculate_delay(1) <= 0.2 for _ in range(20))
    assert all(0.2 <= STEP_RETRY.calculate_delay(2) <= 0.4 for _ in range(20))  # (2^2 - 1) x delay, +/- delay


def _interrupted_asset(calls: list[int], decorator):
    @decorator
    def interrupted(context) -> None:
        calls.append(1)
        raise dg.DagsterExecutionInterruptedError()  # how a run's termination reaches its step

    return interrupted


@pytest.mark.parametrize("decorator, attempts", [
    (deployment.step_asset(), 1),  # ours: the step stops
    (dg.asset(retry_policy=STEP_RETRY), 3),  # Dagster's own: the retry policy applies to interrupts too
])
def test_a_terminated_run_stops_its_step_without_a_retry(tmp_path, decorator, attempts):
    calls: list[int] = []
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize([_interrupted_asset(calls, decorator)], instance=instance, raise_on_error=False)
    assert not result.success and len(calls) == attempts
    assert len(_events(result, RETRY)) == attempts - 1


def test_retry_delay_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(deployment.RETRY_DELAY_ENV)
    assert deployment.retry_delay_seconds() == deployment.DEFAULT_RETRY_DELAY_SECONDS == 10
    monkeypatch.setenv(deployment.RETRY_DELAY_ENV, "2.5")
    assert deployment.retry_delay_seconds() == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(deployment.RETRY_DELAY_ENV, bad)
        with pytest.raises(ValueError, match=f"{deployment.RETRY_DELAY_ENV} must be a number of seconds >= 0"):
            deployment.retry_delay_seconds()


@pytest.mark.parametrize("error", ["OSError", "MemoryError"])
def test_a_transient_error_is_retried_and_the_result_equals_a_clean_run(small_pool, tmp_path, monkeypatch, error):
    clean = _run_pool_shard(tmp_path / "clean", small_pool["pool"], "crawl-b")
    assert clean.success and not _events(clean, RETRY)

    marker = tmp_path / "raised"
    monkeypatch.setenv(failpoints.RAISE_ONCE_ENV, f"storage.write.complete:{error}")
    monkeypatch.setenv(failpoints.RAISE_MARKER_ENV, str(marker))
    faulty = _run_pool_shard(tmp_path / "faulty", small_pool["pool"], "crawl-b")

    assert faulty.success and marker.exists()  # the fault fired, on the first attempt only
    retries = _events(faulty, RETRY)
    assert len(retries) == 1 and len(_events(faulty, RESTART)) == 1
    assert error in retries[0].event_specific_data.error.to_string()
    assert len(_events(faulty, dg.DagsterEventType.STEP_SUCCESS)) == 1
    assert not _events(faulty, dg.DagsterEventType.STEP_FAILURE)
    assert _files(tmp_path / "faulty" / "store") == _files(tmp_path / "clean" / "store")  # no leftovers either
    metadata = {k: v.value for k, v in faulty.asset_materializations_for_node("pool_shard")[0].metadata.items()
                if k != "manifest"}
    assert metadata == {k: v.value for k, v in clean.asset_materializations_for_node("pool_shard")[0]
                        .metadata.items() if k != "manifest"}


def test_bad_input_fails_once_without_retries(small_pool, tmp_path):
    result = _run_pool_shard(tmp_path / "run", small_pool["pool"], "crawl-gone", raise_on_error=False)
    assert not result.success
    assert not _events(result, RETRY) and not _events(result, RESTART)
    failures = _events(result, dg.DagsterEventType.STEP_FAILURE)
    assert len(failures) == 1
    description = failures[0].step_failure_data.user_failure_data.description
    assert "no shard file for partition 'crawl-gone'" in description


def test_a_permanent_failure_is_not_retried_and_any_other_error_is():
    attempts = []

    @dg.asset(retry_policy=STEP_RETRY)
    def flaky() -> dg.MaterializeResult:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("storage hiccup")
        return dg.MaterializeResult(metadata={"attempts": len(attempts)})

    @dg.asset(retry_policy=STEP_RETRY)
    def permanent() -> None:
        attempts.append(1)
        raise PermanentFailure("bad input")

    result = dg.materialize([flaky])
    assert result.success and len(_events(result, RETRY)) == 1
    assert result.asset_materializations_for_node("flaky")[0].metadata["attempts"].value == 2
    attempts.clear()
    result = dg.materialize([permanent], raise_on_error=False)
    assert not result.success and len(attempts) == 1 and not _events(result, RETRY)


def test_runs_whose_process_died_are_retried_not_runs_whose_steps_failed(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.run_monitoring_enabled
    # The compose deployment's instance (PostgreSQL and S3 from the environment): the same settings.
    docker = yaml.safe_load((REPO / "docker" / "dagster.yaml").read_text())
    assert docker["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}
    assert docker["run_monitoring"]["enabled"] is True
