"""Where steps run: the executor per deployment target, the tags that make GPU steps request GPUs, and the
device lease that gives each GPU step on a multi-GPU host its own device.

``GROUPMATES_DEPLOYMENT`` chooses the target:

* ``local`` (default): every step in the run's process; GPU steps lease a device (lib.device_lease) when the host
  has several, so concurrent runs never share one.
* ``k8s``: one Kubernetes Job per step (``dagster_k8s.k8s_job_executor``); GPU steps request ``nvidia.com/gpu``
  and tolerate GPU node taints through their ``dagster-k8s/config`` tag.
* ``ecs``: one ECS task per step (``dagster_aws.ecs.ecs_executor``, with the ECS run launcher); GPU steps add a
  GPU ``resourceRequirements`` container override.

Every GPU asset also declares ``pool="gpu"``: the instance's pool limit (dagster.yaml) caps how many run at once.

Every asset retries its step under ``STEP_RETRY``: a transient error (storage, memory, a step worker that died on
k8s/ECS) gets two more attempts with exponential backoff; steps are idempotent, so an attempt simply starts again.
A ``PermanentFailure`` (bad input, a missing upstream; ``defs/common.py``) is raised with ``allow_retries=False``
and fails at once.
"""

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg

from groupmates_assets.lib.device_lease import DEFAULT_LOCK_DIR, DeviceLease

GPU_POOL = "gpu"
DEPLOYMENTS = ("local", "k8s", "ecs")
RETRY_DELAY_ENV = "GROUPMATES_RETRY_DELAY_SECONDS"
DEFAULT_RETRY_DELAY_SECONDS = 10.0


def retry_delay_seconds() -> float:
    """Base delay of step retries: GROUPMATES_RETRY_DELAY_SECONDS (default 10 s; the tests make it short)."""
    value = os.environ.get(RETRY_DELAY_ENV, "").strip()
    if not value:
        return DEFAULT_RETRY_DELAY_SECONDS
    try:
        delay = float(value)
    except ValueError:
        delay = -1.0
    if not 0 <= delay < float("inf"):
        raise ValueError(f"{RETRY_DELAY_ENV} must be a number of seconds >= 0, got {value!r}")
    return delay


# Two more attempts after the first: about delay (0 to 2 x delay with the jitter), then about 3 x delay.
STEP_RETRY = dg.RetryPolicy(max_retries=2, delay=retry_delay_seconds(), backoff=dg.Backoff.EXPONENTIAL,
                             jitter=dg.Jitter.PLUS_MINUS)


def deployment_target() -> str:
    target = os.environ.get("GROUPMATES_DEPLOYMENT", "local")
    if target not in DEPLOYMENTS:
        raise ValueError(f"GROUPMATES_DEPLOYMENT must be one of {', '.join(DEPLOYMENTS)}, got {target!r}")
    return target


def gpu_op_tags(gpus: int = 1, target: str | None = None) -> dict[str, str]:
    """Step tags that request ``gpus`` GPUs from the target's scheduler (nothing locally: the lease does it)."""
    target = target or deployment_target()
    if target == "k8s":
        config = {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)},
                                               "requests": {"nvidia.com/gpu": str(gpus)}}},
            "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"}]},
        }
        return {"dagster-k8s/config": json.dumps(config)}
    if target == "ecs":
        return {"ecs/container_overrides": json.dumps({"resourceRequirements": [{"type": "GPU",
                                                                                  "value": str(gpus)}]})}
    return {}


def pretrain_gpus() -> int:
    """GPUs one pretraining run asks for under the active profile (``settings.active_profile_name``;
    pretrain.gpus_per_run)."""
    from groupmates_assets.settings import get_profile

    return get_profile().pretrain.gpus_per_run


def gpu_asset_args(partitioned: bool = False, gpus: int = 1,
                   backfill_policy: dg.BackfillPolicy | None = None) -> dict[str, Any]:
    """The ``@asset`` arguments of a GPU step: the gpu pool, the target's GPU request tags, ``STEP_RETRY`` (a
    CUDA out-of-memory error is transient) and, when partitioned, one run per partition in backfills (a failed
    block is retried and watched on its own) unless ``backfill_policy`` says otherwise."""
    args: dict[str, Any] = {"pool": GPU_POOL, "op_tags": gpu_op_tags(gpus), "retry_policy": STEP_RETRY}
    if backfill_policy is not None:
        args["backfill_policy"] = backfill_policy
    elif partitioned:
        args["backfill_policy"] = dg.BackfillPolicy.multi_run(1)
    return args


def stop_on_termination(compute: Callable) -> Callable:
    """A terminated run's step fails at once instead of starting another attempt. Dagster applies a step's retry
    policy to interrupts too (the run's termination arrives in the step as ``DagsterExecutionInterruptedError``), so a
    cancelled backfill's runs would each run their step once more before stopping. A run whose worker died is retried
    by the run retries of dagster.yaml, not by the step's policy."""

    @functools.wraps(compute)
    def wrapper(context: dg.AssetExecutionContext, *args, **kwargs):
        try:
            return compute(context, *args, **kwargs)
        except dg.DagsterExecutionInterruptedError as interrupt:
            raise dg.Failure("the run was terminated; the step stops without a retry", allow_retries=False) \
                from interrupt

    wrapper.stops_on_termination = True  # type: ignore[attr-defined]  # what the tests look for
    return wrapper


def step_asset(**asset_args: Any) -> Callable[[Callable], dg.AssetsDefinition]:
    """``@dg.asset`` with ``STEP_RETRY`` for failures and :func:`stop_on_termination` for terminated runs."""

    def decorate(compute: Callable) -> dg.AssetsDefinition:
        return dg.asset(**{"retry_policy": STEP_RETRY, **asset_args})(stop_on_termination(compute))

    return decorate


def gpu_asset(*, partitioned: bool = False, gpus: int = 1, backfill_policy: dg.BackfillPolicy | None = None,
              **asset_args: Any) -> Callable[[Callable], dg.AssetsDefinition]:
    """A :func:`step_asset` that runs on one leased device: :func:`gpu_asset_args` plus :func:`on_leased_gpu`."""

    def decorate(compute: Callable) -> dg.AssetsDefinition:
        return step_asset(**asset_args, **gpu_asset_args(partitioned, gpus, backfill_policy))(on_leased_gpu(compute))

    return decorate


def executor_for(target: str | None = None) -> dg.ExecutorDefinition:
    target = target or deployment_target()
    if target == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if target == "ecs":
        from dagster_aws.ecs import ecs_executor

        return ecs_executor
    return dg.in_process_executor


def _local_gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def leased_gpus(context: dg.AssetExecutionContext, count: int = 1) -> Iterator[list[int]]:
    """``count`` devices of this host for the block (empty off CUDA or on one GPU, where there is nothing to share
    out); the lock directory is GROUPMATES_GPU_LOCKS."""
    devices = _local_gpus()
    if len(devices) <= 1 or deployment_target() != "local":
        yield devices[:count]
        return
    lease = DeviceLease(devices, os.environ.get("GROUPMATES_GPU_LOCKS", DEFAULT_LOCK_DIR))
    owner = f"run {context.run_id[:8]} step {context.op_execution_context.op.name}"
    with lease.acquire(count, owner=owner) as ids:
        context.log.info(f"leased GPU {', '.join(map(str, ids))}")
        yield ids


def on_leased_gpu(compute: Callable) -> Callable:
    """Run an asset's body on a leased device: ``torch.cuda.set_device`` makes it the default ``cuda`` device."""

    @functools.wraps(compute)
    def wrapper(context: dg.AssetExecutionContext, *args, **kwargs):
        with leased_gpus(context) as ids:
            if ids:
                import torch

                torch.cuda.set_device(ids[0])
            return compute(context, *args, **kwargs)

    return wrapper
