"""Kubernetes on paper, checked by tools: the Jobs dagster-k8s creates for a run of the graph and for a GPU step,
built by dagster-k8s's own builders (the calls K8sRunLauncher and k8s_job_executor's step handler make) from the
settings of k8s/values.yaml, and the Kubernetes objects those values describe; every object is validated against
the Kubernetes API's own schema (kubernetes-validate, strict: an unknown or misplaced field is an error).

Not checked, because neither is on a package registry: rendering the Dagster Helm chart (`helm template`) and the
chart's own values.schema.json. The values' Kubernetes fields are checked where the chart puts them (the pod of
each deployment), and their Dagster settings against Dagster's instance schema, with the chart's camelCase keys
turned into dagster.yaml's.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteRunArgs, ExecuteStepArgs
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_job_name_from_run_id,
    get_k8s_job_name,
    get_user_defined_k8s_config,
)

from groupmates_assets_tests.test_deployment import _click_context
from groupmates_assets_tests.test_gpu_deployment import STEP_TAGS, _in_fresh_process

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
VALUES = REPO / "k8s" / "values.yaml"
K8S_VERSION = "1.33.0"  # the oldest minor version the Kubernetes project still supported when this was written
RUN_ID = "0f3c8a52-5d1e-4c6b-9a0e-2b7d8f1e4c90"
KUBECONFIG = {"apiVersion": "v1", "kind": "Config", "current-context": "paper",
              "clusters": [{"name": "paper", "cluster": {"server": "https://127.0.0.1:6443"}}],
              "users": [{"name": "paper", "user": {"token": "unused"}}],
              "contexts": [{"name": "paper",
                            "context": {"cluster": "paper", "user": "paper", "namespace": "groupmates"}}]}


def _values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text(encoding="utf-8"))


def _deployment() -> dict[str, Any]:
    (deployment,) = _values()["dagster-user-deployments"]["deployments"]
    return deployment


def _image(spec: dict[str, str]) -> str:
    return f"{spec['repository']}:{spec['tag']}"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _as_dict(model: Any) -> dict[str, Any]:
    return kubernetes.client.ApiClient().sanitize_for_serialization(model)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> K8sRunLauncher:
    """The K8sRunLauncher the chart configures from the values (its run_launcher section of dagster.yaml), on a
    kubeconfig that points nowhere: nothing here talks to a cluster."""
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(yaml.safe_dump(KUBECONFIG))
    values = _values()
    config = values["runLauncher"]["config"]["k8sRunLauncher"]
    return K8sRunLauncher(
        service_account_name="groupmates-dagster", instance_config_map="groupmates-dagster-instance",
        postgres_password_secret=values["global"]["postgresqlSecretName"],
        dagster_home=values["global"]["dagsterHome"], image_pull_policy=config["imagePullPolicy"],
        load_incluster_config=False, kubeconfig_file=str(kubeconfig), job_namespace="groupmates",
        env_secrets=[s["name"] for s in config["envSecrets"]],
        run_k8s_config={_snake(k): v for k, v in config["runK8sConfig"].items()})


def _origin(job_name: str) -> JobPythonOrigin:
    """The code location as the user deployment serves it (`dagster code-server start -m ...` in the image)."""
    pointer = ModuleCodePointer("groupmates_assets.definitions", "defs", "/opt/dagster/work")
    return JobPythonOrigin(job_name, RepositoryPythonOrigin("/opt/dagster/venv/bin/python", pointer,
                                                            container_image=_image(_deployment()["image"])))


def run_worker_job(launcher: K8sRunLauncher, run: DagsterRun) -> dict[str, Any]:
    """The Job K8sRunLauncher.launch_run creates for ``run`` (its _launch_k8s_job_with_args, without the API call)."""
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    job_config = context.get_k8s_job_config(job_image=_image(_deployment()["image"]), run_launcher=launcher)
    args = ExecuteRunArgs(job_origin=_origin(run.job_name), run_id=run.run_id, instance_ref=None).get_command_args()
    job_name = get_job_name_from_run_id(run.run_id)
    return _as_dict(construct_dagster_k8s_job(
        job_config=job_config, args=args, job_name=job_name, pod_name=job_name, component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": run.job_name, "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": run.job_name}]))


def step_job(launcher: K8sRunLauncher, run: DagsterRun, step_key: str, step_tags: dict[str, str]) -> dict[str, Any]:
    """The Job k8s_job_executor's K8sStepHandler.launch_step creates for one step with ``step_tags`` (its
    _get_container_context and launch_step, without the API call)."""
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    job_config = context.get_k8s_job_config(_image(_deployment()["image"]), launcher)
    step_args = ExecuteStepArgs(job_origin=_origin(run.job_name), run_id=run.run_id,
                                step_keys_to_execute=[step_key], instance_ref=None)
    job_name = f"dagster-step-{get_k8s_job_name(run.run_id, step_key)}"
    return _as_dict(construct_dagster_k8s_job(
        job_config=job_config, args=step_args.get_command_args(skip_serialized_namedtuple=True), job_name=job_name,
        pod_name=job_name, component="step_worker", user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": run.job_name, "dagster/op": step_key, "dagster/run-id": run.run_id},
        env_vars=[*step_args.get_command_env(), {"name": "DAGSTER_RUN_JOB_NAME", "value": run.job_name},
                  {"name": "DAGSTER_RUN_STEP_KEY", "value": step_key}]))


@pytest.fixture(scope="module")
def k8s_step_tags() -> dict[str, dict[str, str]]:
    """The step tags of the definitions under the user deployment's environment (GROUPMATES_DEPLOYMENT=k8s, its
    profile), read in a fresh interpreter: the tags are fixed when the definitions are imported."""
    env = {e["name"]: e["value"] for e in _deployment()["env"]}
    return _in_fresh_process(STEP_TAGS, GROUPMATES_DEPLOYMENT=env["GROUPMATES_DEPLOYMENT"],
                             GROUPMATES_PROFILE=env["GROUPMATES_PROFILE"])["tags"]


def test_the_run_worker_job_is_a_valid_kubernetes_job(launcher):
    job = run_worker_job(launcher, DagsterRun(job_name="__ASSET_JOB", run_id=RUN_ID))
    _validate(job)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == _image(_deployment()["image"])
    assert container["args"][:5] == ["/opt/dagster/venv/bin/python", "-m", "dagster", "api", "execute_run"]
    assert {"secretRef": {"name": "groupmates-s3"}} in container["envFrom"]
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "1Gi"}
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])  # the run worker only orchestrates
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "run_worker"


@pytest.mark.parametrize(("asset", "gpus"), [("pretrain_checkpoints", "8"), ("pool_predictions", "1")])
def test_a_gpu_step_job_requests_its_gpus_and_tolerates_the_gpu_nodes(launcher, k8s_step_tags, asset, gpus):
    """The user deployment's profile (dclm-400m) pretrains on 8 GPUs per run; other GPU steps take one."""
    job = step_job(launcher, DagsterRun(job_name="__ASSET_JOB", run_id=RUN_ID), asset, k8s_step_tags[asset])
    _validate(job)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"][
        "nvidia.com/gpu"] == gpus
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["args"][:5] == ["/opt/dagster/venv/bin/python", "-m", "dagster", "api", "execute_step"]
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "step_worker"


def test_a_cpu_step_job_asks_for_no_gpu(launcher, k8s_step_tags):
    job = step_job(launcher, DagsterRun(job_name="__ASSET_JOB", run_id=RUN_ID), "filtered_pool_shard",
                   k8s_step_tags["filtered_pool_shard"])
    _validate(job)
    assert "nvidia.com/gpu" not in json.dumps(job["spec"]["template"]["spec"])


def test_the_validation_refuses_what_kubernetes_would(launcher):
    """Not vacuous: a misspelt field and a wrongly typed one in the run worker's config fail the schema."""
    job = run_worker_job(launcher, DagsterRun(job_name="__ASSET_JOB", run_id=RUN_ID))
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["backoffLimit"] = "four"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            _validate(bad)


def _pod_of(component: dict[str, Any], name: str, command: list[str] | None = None) -> dict[str, Any]:
    """A Deployment holding one of the values' components where the chart puts its fields: the container's
    image, env, envFrom, resources and securityContext, the pod's securityContext."""
    container: dict[str, Any] = {"name": name, "image": _image(component["image"]),
                                 "imagePullPolicy": component["image"]["pullPolicy"]}
    if command:
        container["command"] = command
    if isinstance(component.get("env"), list):
        container["env"] = component["env"]
    if component.get("envSecrets"):
        container["envFrom"] = [{"secretRef": s} for s in component["envSecrets"]]
    for key in ("resources", "securityContext"):
        if key in component:
            container[key] = component[key]
    pod: dict[str, Any] = {"containers": [container]}
    if "podSecurityContext" in component:
        pod["securityContext"] = component["podSecurityContext"]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}}


def test_the_values_kubernetes_fields_are_valid_where_the_chart_puts_them():
    values = _values()
    deployment = _deployment()
    code_server = ["dagster", "code-server", "start", *deployment["codeServerArgs"], "-h", "0.0.0.0", "-p",
                   str(deployment["port"])]
    _click_context("dagster", code_server[1:])  # the arguments parse with the installed Dagster's own CLI
    for name, component, command in (("groupmates-assets", deployment, code_server),
                                     ("dagster-webserver", values["dagsterWebserver"], None),
                                     ("dagster-daemon", {**values["dagsterDaemon"], "env": None}, None)):
        _validate(_pod_of(component, name, command))
    assert UserDefinedDagsterK8sConfig.from_dict(  # the run worker's overrides parse as dagster-k8s reads them
        {_snake(k): v for k, v in values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"].items()})


def test_the_values_dagster_settings_pass_dagsters_instance_schema(tmp_path):
    """Run queue, run monitoring, run retries, pools and step logs as the chart writes them into dagster.yaml."""
    from dagster._core.instance.config import dagster_instance_config

    values = _values()
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    s3_logs = values["computeLogManager"]["config"]["s3ComputeLogManager"]
    instance = {
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {_snake(k): v for k, v in queued.items()}},
        "run_monitoring": {_snake(k): v for k, v in daemon["runMonitoring"].items()},
        "run_retries": {_snake(k): v for k, v in daemon["runRetries"].items()},
        "concurrency": {part: {_snake(k): v for k, v in values["concurrency"][part].items()}
                        for part in ("runs", "pools")},
        "compute_logs": {"module": "dagster_aws.s3.compute_log_manager", "class": "S3ComputeLogManager",
                         "config": s3_logs},
    }
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_monitoring"]["max_resume_run_attempts"] >= 1 and config["run_retries"]["max_retries"] >= 1
    assert values["concurrency"]["pools"]["defaultLimit"] >= 8  # the GPUs one dclm-400m pretraining run takes
    assert {e["name"]: e["value"] for e in _deployment()["env"]}["GROUPMATES_DEPLOYMENT"] == "k8s"
