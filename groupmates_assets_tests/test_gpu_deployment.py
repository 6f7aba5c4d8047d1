"""GPU steps: pool declarations, the tags each deployment target turns into GPU requests, and device leases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from groupmates_assets.lib.device_lease import DeviceLease, LeaseTimeout, visible_devices
from groupmates_assets_tests.test_asset_specs import load_snapshot

pytestmark = pytest.mark.unit


def _in_fresh_process(script: str, **env: str) -> dict:
    """Run ``script`` (which prints one JSON object) in a new interpreter: asset tags are fixed at import time."""
    environment = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=environment, capture_output=True,
                         text=True, timeout=180, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


STEP_TAGS = """
    import json
    import dagster as dg
    from groupmates_assets.definitions import build_definitions
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    print(json.dumps({
        "executor": defs.resolve_job_def("pretrain_job").executor_def.name,
        "gpu": sorted(n.key.to_user_string() for n in graph.asset_nodes if "gpu" in (n.pools or set())),
        "tags": {k: dict(defs.get_assets_def(dg.AssetKey(k)).op.tags) for k in ("pretrain_checkpoints",
                                                                               "pool_predictions",
                                                                               "filtered_pool_shard")},
    }))
"""


def test_local_deployment_declares_the_gpu_pool_without_scheduler_tags():
    result = _in_fresh_process(STEP_TAGS, GROUPMATES_DEPLOYMENT="local")
    assert set(result["gpu"]) == {k for k, spec in load_snapshot()["assets"].items() if "gpu" in spec["pools"]}
    assert result["executor"] == "in_process" and all(not t for t in result["tags"].values())


def test_kubernetes_steps_request_gpus():
    """The tags go through dagster-k8s's own parser into the container of the step's Job."""
    result = _in_fresh_process(STEP_TAGS, GROUPMATES_DEPLOYMENT="k8s", GROUPMATES_PROFILE="dclm-400m")
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    assert result["executor"] == "k8s"
    assert result["tags"]["filtered_pool_shard"] == {}  # CPU steps ask for no GPU
    for asset, gpus in (("pretrain_checkpoints", "8"), ("pool_predictions", "1")):  # dclm-400m: 8 GPUs per run
        user_config = get_user_defined_k8s_config(result["tags"][asset])
        job = construct_dagster_k8s_job(DagsterK8sJobConfig(job_image="groupmates-assets:cuda",
                                                            dagster_home="/opt/dagster/home"),
                                        ["dagster", "api", "execute_step"], f"step-{asset}".replace("_", "-"),
                                        user_defined_k8s_config=user_config)
        container = job.spec.template.spec.containers[0]
        assert container.resources.limits["nvidia.com/gpu"] == gpus, asset
        assert any(t.key == "nvidia.com/gpu" for t in job.spec.template.spec.tolerations)


def test_ecs_steps_request_gpus():
    """dagster-aws's ECS step handler turns the tag into the container override of the step's task."""
    result = _in_fresh_process(STEP_TAGS, GROUPMATES_DEPLOYMENT="ecs")
    from dagster_aws.ecs.executor import EcsStepHandler

    assert result["executor"] == "ecs"
    overrides = EcsStepHandler._get_container_overrides(None, result["tags"]["pool_predictions"])
    assert overrides == {"resourceRequirements": [{"type": "GPU", "value": "1"}]}
    assert EcsStepHandler._get_container_overrides(None, result["tags"]["filtered_pool_shard"]) == {}


def test_an_unknown_deployment_is_refused():
    with pytest.raises(subprocess.CalledProcessError) as error:
        _in_fresh_process(STEP_TAGS, GROUPMATES_DEPLOYMENT="slurm")
    assert "GROUPMATES_DEPLOYMENT must be one of local, k8s, ecs" in error.value.stderr


def test_instance_limits_the_gpu_pool_and_frees_slots_of_crashed_runs():
    import yaml

    config = yaml.safe_load((Path(__file__).parent.parent / "dagster.yaml").read_text())
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0


def test_leases_hand_out_distinct_devices_and_wait_when_all_are_taken(tmp_path):
    lease = DeviceLease([0, 1, 2], lock_dir=str(tmp_path))
    with lease.acquire(2, owner="run a") as first, lease.acquire(1, owner="run b") as second:
        assert len(first) == 2 and len(second) == 1 and not set(first) & set(second)
        assert visible_devices(first) == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, first))}
        with pytest.raises(LeaseTimeout, match=r"no 1 free GPU.*run a pid"), lease.acquire(
                1, owner="run c", timeout=0.2, poll_seconds=0.05):
            pass
    with lease.acquire(3, timeout=0) as every:  # all released on exit
        assert sorted(every) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot lease 4 of 3"), lease.acquire(4):
        pass


def test_a_killed_holder_frees_its_device(tmp_path):
    """The kernel drops a flock with its process: a crashed step never keeps a GPU."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from groupmates_assets.lib.device_lease import DeviceLease
        with DeviceLease([0], lock_dir={str(tmp_path)!r}).acquire(1, owner="doomed"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lease = DeviceLease([0], lock_dir=str(tmp_path))
        with pytest.raises(LeaseTimeout, match="doomed"), lease.acquire(1, timeout=0.1, poll_seconds=0.05):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        with lease.acquire(1, timeout=5, poll_seconds=0.05) as ids:
            assert ids == [0] and time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
