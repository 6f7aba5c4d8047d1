"""Pretraining stage: the target LM on each method's tokenized corpus, for every seed, resumable.

With S = 2 (the paper) each run continues the LM run of the probe checkpoint (stage 1, on the filtered pool) on
the method's selected data up to the run's last step; with S = 1 it trains from scratch on the selected data.
Runs execute in this process, or under torchrun (one data-parallel process per device) launched through Dagster
Pipes, whose rank 0 reports back; both write the same checkpoints, so either can resume the other.
"""

import os
import sys
import tempfile
import time

import dagster as dg
import numpy as np
import torch

from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.deployment import gpu_asset_args, leased_gpus, pretrain_gpus, step_asset
from groupmates_assets.defs.partitions import selection_methods
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import optim_config
from groupmates_assets.lib import layout, lm, plots
from groupmates_assets.lib import pretraining as pt
from groupmates_assets.lib.device_lease import visible_devices
from groupmates_assets.lib.storage import Storage


def run_specs(platform: PlatformResource, method: str) -> tuple[str, list[pt.RunSpec]]:
    """(fingerprint, one spec per seed) of ``method``'s runs under the active profile."""
    storage, settings = platform.storage(), platform.settings()
    profile, stages = settings.lm, settings.pretrain.stages
    current = layout.current_corpus(storage, method)
    orders_path = f"{current['path']}/orders.npy"
    orders = storage.read_numpy(orders_path)
    if orders.shape[0] < settings.pretrain.seeds:
        raise PermanentFailure(f"the {method} corpus holds training orders for {orders.shape[0]} seeds but "
                              f"pretrain.seeds is {settings.pretrain.seeds}: rematerialize tokenized_corpus")
    start = profile.probe_steps if stages == 2 else 0
    steps = orders.shape[1] // profile.batch_size
    cfg = lm.OptimConfig(**{**optim_config(profile).to_dict(), "total_steps": start + steps})
    probe_sha = None
    if stages == 2:
        if not storage.exists(f"{layout.PROBE_CHECKPOINT_DIR}/trainer_state.json"):
            raise PermanentFailure("S = 2 continues the probe checkpoint's run: materialize probe_checkpoint first")
        probe_sha = storage.info(f"{layout.PROBE_CHECKPOINT_DIR}/model.safetensors").sha256
    shape = lm.get_shape(profile.shape)
    run_fp = layout.fingerprint(corpus=current["fingerprint"], stages=stages, probe=probe_sha, shape=shape.to_dict(),
                                optim=cfg.to_dict(), batch_size=profile.batch_size, seed=profile.seed)
    specs = [pt.RunSpec(
        run_dir=f"{layout.pretrain_dir(method)}/{run_fp}/seed-{seed}", contexts_path=f"{current['path']}/contexts.npy",
        orders_path=orders_path, seed_index=seed, shape=shape.to_dict(), optim=cfg.to_dict(),
        batch_size=profile.batch_size, start_step=start,
        init_checkpoint=layout.PROBE_CHECKPOINT_DIR if stages == 2 else None, init_seed=profile.seed,
        checkpoint_every=settings.pretrain.checkpoint_every,
        extra={"method": method, "corpus": current, "stages": stages, "probe_model_sha256": probe_sha},
    ) for seed in range(settings.pretrain.seeds)]
    return run_fp, specs


def _run_torchrun(context: dg.AssetExecutionContext, platform: PlatformResource, spec: pt.RunSpec) -> dict:
    """One run under torchrun through Dagster Pipes on leased devices; returns rank 0's report."""
    settings = platform.settings()
    gpus = settings.pretrain.gpus_per_run
    with leased_gpus(context, gpus) as ids, tempfile.TemporaryDirectory(prefix="groupmates-run-") as tmp:
        spec_path = os.path.join(tmp, "run.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            handle.write(spec.to_json())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                   "-m", "groupmates_assets.workers.torchrun_pretrain", "--spec", spec_path,
                   "--storage-root", platform.storage_root]
        if not torch.cuda.is_available():
            command += ["--device", "cpu", "--threads", str(max(1, settings.lm.torch_threads // gpus))]
        env = visible_devices(ids) if ids else {}
        invocation = dg.PipesSubprocessClient().run(command=command, context=context, env=env)
    reports = invocation.get_custom_messages()
    if not reports:
        raise PermanentFailure(f"torchrun finished without a report from rank 0 for {spec.run_dir}")
    return reports[-1]


def _train_all(context: dg.AssetExecutionContext, platform: PlatformResource, specs: list[pt.RunSpec]) -> list[dict]:
    settings, storage = platform.settings(), platform.storage()
    torch.set_num_threads(settings.lm.torch_threads)
    reports, device = [], lm.default_device()
    where = f"torchrun x {settings.pretrain.gpus_per_run}" if settings.pretrain.uses_torchrun else str(device)
    for spec in specs:
        if pt.latest_checkpoint(storage, spec.run_dir) >= spec.total_steps:
            context.log.info(f"{spec.run_dir}: complete, nothing to train")
            reports.append({"run_dir": spec.run_dir, "resumed_from": spec.total_steps, "seconds": 0.0,
                            "tokens_per_second": None})
            continue
        context.log.info(f"{spec.run_dir}: steps {spec.start_step} -> {spec.total_steps} ({where})")
        if settings.pretrain.uses_torchrun:
            reports.append(_run_torchrun(context, platform, spec))
        else:
            with leased_gpus(context) as ids:
                device = torch.device("cuda", ids[0]) if ids else lm.default_device()
                result = pt.run_training(storage, spec, device, log=context.log.info)
            reports.append({"run_dir": result.run_dir, "resumed_from": result.resumed_from,
                            "seconds": round(result.seconds, 2), "tokens_per_second": result.tokens_per_second})
    return reports


def _curves_png(storage: Storage, specs: list[pt.RunSpec], method: str) -> bytes:
    series = {}
    for spec in specs:
        curve = storage.read_json(f"{spec.run_dir}/{pt.CURVE_FILE}")
        series[f"seed {spec.seed_index}"] = ([r["step"] for r in curve], [r["loss"] for r in curve])
    return plots.lines_png(series, f"{method}: training loss", "step", "loss (CE + z-loss)")


@step_asset(
    partitions_def=selection_methods,
    group_name="pretrain",
    code_version="pretrain-v2",
    deps=["tokenized_corpus", "probe_checkpoint"],
    kinds={"pytorch", "safetensors"},
    **gpu_asset_args(partitioned=True, gpus=pretrain_gpus()),
)
def pretrain_checkpoints(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The target LM trained on one method's tokenized corpus at the shared token budget, once per seed: with S = 2 the
    probe checkpoint's run continues on the selected data (stage 2), with S = 1 a run starts from scratch.
    Checkpoints (weights, optimizer state, step, tokens) every pretrain.checkpoint_every steps; a killed run resumes
    from its last complete checkpoint and reads exactly the batches it would have read. pretrain.gpus_per_run > 1
    runs torchrun through Dagster Pipes."""
    storage, settings = platform.storage(), platform.settings()
    method = context.partition_key
    run_fp, specs = run_specs(platform, method)
    started = time.perf_counter()
    reports = _train_all(context, platform, specs)
    runs = []
    for spec in specs:
        steps = pt.saved_checkpoints(storage, spec.run_dir)
        if not steps or steps[-1] != spec.total_steps:
            raise PermanentFailure(f"{spec.run_dir} ended without its final checkpoint (step {spec.total_steps})")
        curve = storage.read_json(f"{spec.run_dir}/{pt.CURVE_FILE}")
        runs.append({"seed": spec.seed_index, "path": spec.run_dir, "final": pt.checkpoint_dir(spec.run_dir, steps[-1]),
                     "checkpoints": steps, "final_loss": curve[-1]["loss"], "tokens_seen": curve[-1]["tokens_seen"]})
    spec = specs[0]
    layout.write_pointer(storage, layout.pretrain_dir(method), {
        "fingerprint": run_fp, "stages": settings.pretrain.stages, "start_step": spec.start_step,
        "total_steps": spec.total_steps, "batch_size": spec.batch_size, "runs": runs})
    final_losses = [r["final_loss"] for r in runs]
    rates = [r["tokens_per_second"] for r in reports if r.get("tokens_per_second")]
    return dg.MaterializeResult(metadata={
        "stages": settings.pretrain.stages, "seeds": len(runs), "start_step": spec.start_step,
        "final_step": spec.total_steps, "stage_steps": spec.total_steps - spec.start_step,
        "tokens_seen": runs[0]["tokens_seen"],
        "final_loss_mean": round(float(np.mean(final_losses)), 4),
        "final_loss_std": round(float(np.std(final_losses)), 4),
        "resumed_from_steps": dg.MetadataValue.json([r.get("resumed_from", 0) for r in reports]),
        "seconds": round(time.perf_counter() - started, 1),
        "tokens_per_second": round(float(np.mean(rates)), 1) if rates else None,
        "launcher": "torchrun" if settings.pretrain.uses_torchrun else "in_process",
        "device": str(lm.default_device()),
        "checkpoints": dg.MetadataValue.json({f"seed-{r['seed']}": r["checkpoints"] for r in runs}),
        "loss_curve": dg.MetadataValue.md(plots.png_markdown(_curves_png(storage, specs, method), "loss curves")),
        "fingerprint": run_fp, "path": dg.MetadataValue.path(storage.url(f"{layout.pretrain_dir(method)}/{run_fp}")),
    })
