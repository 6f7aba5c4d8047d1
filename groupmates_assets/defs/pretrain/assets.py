"""Pretraining stage: the target LM trained from scratch on each method's tokenized corpus, resumable."""

import tempfile
import time

import dagster as dg
import numpy as np
import torch

from groupmates_assets.defs.corpus.assets import TOKENIZED_CORPUS_DIR, tokenized_corpus
from groupmates_assets.defs.lm.assets import CHECKPOINT_FILES, optim_config
from groupmates_assets.defs.partitions import selection_methods
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import lm, plots
from groupmates_assets.lib.storage import Storage

PRETRAIN_DIR = "pretrain"


def corpus_batches(tokens: np.ndarray, order: np.ndarray, batch_size: int, start_step: int):
    """[B, L+1] int64 batches in the corpus' training order, from optimizer step ``start_step`` on, so a resumed
    run reads exactly the batches an uninterrupted one would have."""
    for start in range(start_step * batch_size, len(order) - batch_size + 1, batch_size):
        yield torch.from_numpy(np.asarray(tokens[order[start:start + batch_size]]).astype(np.int64))


def latest_checkpoint(storage: Storage, run_dir: str) -> int:
    """The last step with a complete checkpoint (trainer_state.json is written last), or 0."""
    steps = [int(name.split("-")[1]) for name in storage.list(run_dir) if name.startswith("step-")
             and storage.exists(f"{run_dir}/{name}/trainer_state.json")]
    return max(steps, default=0)


def _save(storage: Storage, run_dir: str, model, optimizer, shape, cfg, step: int, extra: dict) -> str:
    with tempfile.TemporaryDirectory(prefix="groupmates-pretrain-") as tmp:
        lm.save_checkpoint(tmp, model, optimizer, shape, cfg, step, extra)
        target = f"{run_dir}/step-{step:06d}"
        storage.remove(f"{target}/trainer_state.json")  # completion marker goes last (CHECKPOINT_FILES ends with it)
        storage.put_dir(tmp, target, CHECKPOINT_FILES)
    return target


def load_checkpoint_from(storage: Storage, checkpoint_dir: str, device):
    """(model, optimizer, state) of a stored checkpoint, through a local copy (works for any storage root)."""
    with storage.local_dir(checkpoint_dir, CHECKPOINT_FILES) as local:
        return lm.load_checkpoint(local, device)


@dg.asset(
    partitions_def=selection_methods,
    group_name="pretrain",
    code_version="pretrain-v1",
    deps=[tokenized_corpus],
    kinds={"pytorch", "safetensors"},
    description="The target LM trained from scratch on one method's tokenized corpus at the shared token budget, "
    "with checkpoints (weights, optimizer state, step, tokens) every corpus.checkpoint_every steps; a killed run "
    "resumes from its last complete checkpoint and reads exactly the batches it would have read.",
)
def pretrain_checkpoints(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings()
    method, profile = context.partition_key, settings.lm
    torch.set_num_threads(profile.torch_threads)
    current = storage.read_json(f"{TOKENIZED_CORPUS_DIR}/{method}/current.json")
    tokens = storage.read_numpy(f"{current['path']}/contexts.npy")
    order = np.asarray(storage.read_numpy(f"{current['path']}/order.npy"))
    shape = lm.get_shape(profile.shape)
    if tokens.shape[1] != shape.seq_len + 1:
        raise dg.Failure(f"the {method} corpus holds contexts of {tokens.shape[1]} tokens but the {shape.name} LM "
                         f"needs {shape.seq_len + 1}: rematerialize tokenized_corpus")
    steps = len(order) // profile.batch_size
    cfg = lm.OptimConfig(**{**optim_config(profile).to_dict(), "total_steps": steps})
    run_dir = f"{PRETRAIN_DIR}/{method}/{current['fingerprint']}"
    device = lm.default_device()
    resumed_from = latest_checkpoint(storage, run_dir)
    if resumed_from:
        model, optimizer, _ = load_checkpoint_from(storage, f"{run_dir}/step-{resumed_from:06d}", device)
        context.log.info(f"{method}: resuming from step {resumed_from} of {steps}")
    else:
        model = lm.build_model(shape, seed=profile.seed, device=device)
        optimizer = lm.make_optimizer(model, cfg)
    history = storage.read_json(f"{run_dir}/curve.json") if resumed_from and storage.exists(
        f"{run_dir}/curve.json") else []
    history = [r for r in history if r["step"] <= resumed_from]
    every = max(1, settings.corpus.checkpoint_every)
    started, step, checkpoints = time.perf_counter(), resumed_from, []
    batches = corpus_batches(tokens, order, profile.batch_size, resumed_from)
    while step < steps:
        chunk = min(every - step % every, steps - step)
        curve = lm.pretrain(model, optimizer, (b.to(device) for b in batches), cfg, start_step=step, steps=chunk,
                            tokens_seen=step * profile.batch_size * shape.seq_len)
        history += curve
        step = int(curve[-1]["step"])
        target = _save(storage, run_dir, model, optimizer, shape, cfg, step,
                       {"method": method, "tokens_seen": int(curve[-1]["tokens_seen"]), "corpus": current})
        storage.write_json(f"{run_dir}/curve.json", history)
        checkpoints.append(target)
        context.log.info(f"{method}: step {step}/{steps}, loss {curve[-1]['loss']:.3f}, "
                         f"{time.perf_counter() - started:.0f} s; checkpoint {target}")
    storage.write_json(f"{PRETRAIN_DIR}/{method}/current.json", {"path": run_dir, "final": f"{run_dir}/step-"
                                                                  f"{steps:06d}", "steps": steps})
    png = plots.line_png([r["step"] for r in history], [r["loss"] for r in history], f"{method}: training loss",
                         "step", "loss (CE + z-loss)") if history else b""
    return dg.MaterializeResult(metadata={
        "steps": steps, "resumed_from_step": resumed_from, "checkpoints": dg.MetadataValue.json(
            sorted(n for n in storage.list(run_dir) if n.startswith("step-"))),
        "tokens_seen": int(history[-1]["tokens_seen"]) if history else 0,
        "final_loss": round(history[-1]["loss"], 4) if history else None, "device": str(device),
        "loss_curve": dg.MetadataValue.md(plots.png_markdown(png, "loss curve")) if history else "",
        "corpus_fingerprint": current["fingerprint"], "path": dg.MetadataValue.path(storage.url(run_dir)),
    })
