"""LM stage: the proxy LM pretrained on the filtered pool up to the probe checkpoint (model + optimizer)."""

import tempfile
import time
from typing import Any

import dagster as dg
import torch

from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.deployment import gpu_asset
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import optim_config, tokenized_pool
from groupmates_assets.lib import layout, lm, plots
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import LMProfile


@gpu_asset(
    group_name="lm",
    code_version="probe-checkpoint-v1",
    deps=[dg.AssetDep("tokenized_pool_shard", partition_mapping=dg.AllPartitionMapping())],
    kinds={"pytorch", "safetensors"},
)
def probe_checkpoint(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The proxy LM (open_lm-shaped Llama) pretrained on the tokenized pool for a share of its token budget; model
    weights (safetensors), AdamW state, step and learning rate: the state every oracle trajectory starts from."""
    storage, profile = platform.storage(), platform.settings(alone=True).lm
    torch.set_num_threads(profile.torch_threads)
    pool, manifests = tokenized_pool(storage, context.instance)
    shape, cfg = lm.get_shape(profile.shape), optim_config(profile)
    if pool.context_len != shape.seq_len + 1:
        raise PermanentFailure(f"tokenized contexts hold {pool.context_len} tokens but the {shape.name} LM needs "
                              f"{shape.seq_len + 1}: re-materialize tokenized_pool_shard")
    steps = profile.probe_steps
    device = lm.default_device()
    model = lm.build_model(shape, seed=profile.seed, device=device)
    optimizer = lm.make_optimizer(model, cfg)
    micro_batch = lm.default_micro_batch(shape.seq_len, device)  # a 411m batch of 512 does not fit one pass
    context.log.info(f"pretraining {shape.name} ({lm.param_count(shape):,} parameters) on {device} for {steps} of "
                     f"{profile.total_steps} steps, {profile.batch_size} x {shape.seq_len + 1} tokens per step"
                     + (f" in passes of {micro_batch}" if micro_batch and micro_batch < profile.batch_size else ""))
    started = time.perf_counter()
    curve = lm.pretrain(
        model, optimizer, (batch.to(device) for batch in pool.batches(profile.batch_size, profile.seed)), cfg,
        steps=steps, log_every=max(1, steps // 10), micro_batch=micro_batch,
        log=lambda r: context.log.info(f"step {r['step']}/{steps}: loss {r['loss']:.3f}, lr {r['lr']:.2e}, "
                                       f"{r['tokens_seen']:,} tokens, {time.perf_counter() - started:.0f} s"),
    )
    seconds = time.perf_counter() - started
    extra = {"tokens_seen": int(curve[-1]["tokens_seen"]), "probe_fraction": profile.probe_fraction,
             "seed": profile.seed, "tokenized_shards": [m["shard_key"] for m in manifests],
             "final_loss": curve[-1]["loss"]}
    with tempfile.TemporaryDirectory(prefix="groupmates-ckpt-") as tmp:
        lm.save_checkpoint(tmp, model, optimizer, shape, cfg, steps, extra)
        storage.remove(f"{layout.PROBE_CHECKPOINT_DIR}/trainer_state.json")  # completion marker goes last
        infos = storage.put_dir(tmp, layout.PROBE_CHECKPOINT_DIR, layout.PROBE_CHECKPOINT_FILES)
    return dg.MaterializeResult(
        metadata=_checkpoint_metadata(storage, profile, shape, cfg, optimizer, curve, seconds, device,
                                      infos["model.safetensors"].sha256),
        data_version=dg.DataVersion(infos["model.safetensors"].sha256[:12]),
    )


def _checkpoint_metadata(storage: Storage, profile: LMProfile, shape: lm.LMShape, cfg: lm.OptimConfig,
                         optimizer: torch.optim.Optimizer, curve: list[dict[str, float]], seconds: float,
                         device: torch.device, model_sha256: str) -> dict[str, Any]:
    tokens_seen = int(curve[-1]["tokens_seen"])
    png = plots.line_png([r["step"] for r in curve], [r["loss"] for r in curve], f"{shape.name}: training loss",
                         "step", "loss (CE + z-loss)")
    return {
        "checkpoint_version": model_sha256[:12], "step": profile.probe_steps, "total_steps": profile.total_steps,
        "learning_rate": lm.current_lr(optimizer), "tokens_seen": tokens_seen,
        "final_loss": round(curve[-1]["loss"], 4), "parameters": lm.param_count(shape),
        "non_embedding_parameters": lm.param_count(shape, embeddings=False),
        "shape": dg.MetadataValue.json(shape.to_dict()), "optimizer": dg.MetadataValue.json(cfg.to_dict()),
        "tokens_per_second": round(tokens_seen / seconds, 1), "device": str(device),
        "loss_curve": dg.MetadataValue.md(plots.png_markdown(png, "loss curve")),
        "path": dg.MetadataValue.path(storage.url(layout.PROBE_CHECKPOINT_DIR)),
        "model_sha256": model_sha256,
    }
