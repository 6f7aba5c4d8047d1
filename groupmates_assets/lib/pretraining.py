"""One target-LM run on a tokenized corpus: start (from scratch or from the stage-1 checkpoint) or resume, train
in checkpointed chunks, save. Shared by the in-process asset and the torchrun worker, so both write the same
files and a run started by one can be resumed by the other.

Plain torch (no Dagster). With ``world > 1`` the model is wrapped in DistributedDataParallel and each rank trains
on its contiguous slice of every global batch; gradients are averaged, so a step equals the single-process step
on the whole batch.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from groupmates_assets.lib import failpoints, lm
from groupmates_assets.lib.lm.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
from groupmates_assets.lib.storage import Storage

CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)  # the state file last: it marks a complete checkpoint
CURVE_FILE = "curve.json"


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, as JSON (the torchrun worker reads it from a file)."""

    run_dir: str  # storage-relative folder of this run's checkpoints and curve
    contexts_path: str  # [n, seq_len + 1] token contexts of the corpus
    orders_path: str  # [seeds, budget_contexts] training orders
    seed_index: int  # row of the orders; also offsets the initialisation seed of a from-scratch run
    shape: dict[str, Any]
    optim: dict[str, Any]  # OptimConfig; its total_steps is where this run ends
    batch_size: int  # global sequences per optimizer step
    start_step: int  # 0 from scratch, the stage-1 steps when continuing the probe's run
    init_checkpoint: str | None  # storage folder of the stage-1 checkpoint (S = 2), else None
    init_seed: int
    checkpoint_every: int
    extra: dict[str, Any] = field(default_factory=dict)  # written into every checkpoint's trainer state

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls(**json.loads(text))

    @property
    def total_steps(self) -> int:
        return int(self.optim["total_steps"])


def corpus_batches(tokens: np.ndarray, order: np.ndarray, batch_size: int, start_batch: int,
                   rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """[B / world, L+1] int64 slices of the global batches in training order from batch ``start_batch`` on, so a
    resumed run reads exactly the batches an uninterrupted one would have."""
    per_rank = batch_size // world
    for start in range(start_batch * batch_size, len(order) - batch_size + 1, batch_size):
        rows = order[start + rank * per_rank:start + (rank + 1) * per_rank]
        yield torch.from_numpy(np.asarray(tokens[rows]).astype(np.int64))


def latest_checkpoint(storage: Storage, run_dir: str) -> int:
    """The last step with a complete checkpoint (trainer_state.json is written last), or 0."""
    steps = [int(name.split("-")[1]) for name in storage.list(run_dir) if name.startswith("step-")
             and storage.exists(f"{run_dir}/{name}/{STATE_FILE}")]
    return max(steps, default=0)


def checkpoint_dir(run_dir: str, step: int) -> str:
    return f"{run_dir}/step-{step:06d}"


def load_checkpoint_from(storage: Storage, folder: str, device: torch.device | str):
    """(model, optimizer, state) of a stored checkpoint, through a local copy (works for any storage root)."""
    with storage.local_dir(folder, CHECKPOINT_FILES) as local:
        return lm.load_checkpoint(local, device)


def load_weights_from(storage: Storage, folder: str, device: torch.device | str):
    """(model, state) of a stored checkpoint, without reading its optimizer state."""
    with storage.local_dir(folder, (MODEL_FILE, STATE_FILE)) as local:
        return lm.load_weights(local, device)


def save_checkpoint_to(storage: Storage, folder: str, model, optimizer, shape: lm.LMShape, cfg: lm.OptimConfig,
                       step: int, extra: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="groupmates-pretrain-") as tmp:
        lm.save_checkpoint(tmp, model, optimizer, shape, cfg, step, extra)
        storage.remove(f"{folder}/{STATE_FILE}")  # an interrupted overwrite must read as incomplete
        storage.put_dir(tmp, folder, CHECKPOINT_FILES)


@dataclass
class RunResult:
    run_dir: str
    start_step: int
    resumed_from: int
    final_step: int
    checkpoints: list[int]
    curve: list[dict[str, float]]
    seconds: float
    tokens_per_second: float | None


def _start(storage: Storage, spec: RunSpec, device: torch.device) -> tuple[Any, Any, int, int]:
    """(model, optimizer, step, resumed_from): the last checkpoint of this run, else its initial state."""
    resumed = latest_checkpoint(storage, spec.run_dir)
    if resumed:
        model, optimizer, _ = load_checkpoint_from(storage, checkpoint_dir(spec.run_dir, resumed), device)
        return model, optimizer, resumed, resumed
    cfg = lm.OptimConfig.from_dict(spec.optim)
    if spec.init_checkpoint:
        model, optimizer, state = load_checkpoint_from(storage, spec.init_checkpoint, device)
        if int(state["step"]) != spec.start_step:
            raise ValueError(f"{spec.init_checkpoint} is at step {state['step']}, but stage 2 starts at step "
                             f"{spec.start_step}: rematerialize the stage-1 checkpoint or the corpus")
        return model, optimizer, spec.start_step, 0
    model = lm.build_model(lm.LMShape.from_dict(spec.shape), seed=spec.init_seed + spec.seed_index, device=device)
    return model, lm.make_optimizer(model, cfg), spec.start_step, 0


def run_training(storage: Storage, spec: RunSpec, device: torch.device | str,
                 log: Callable[[str], None] = print, rank: int = 0, world: int = 1) -> RunResult:
    """Train one run to ``spec.total_steps`` (resuming from its last complete checkpoint); rank 0 writes."""
    device = torch.device(device)
    shape, cfg = lm.LMShape.from_dict(spec.shape), lm.OptimConfig.from_dict(spec.optim)
    if spec.batch_size % world:
        raise ValueError(f"a batch of {spec.batch_size} sequences does not split over {world} processes")
    tokens = storage.read_numpy(spec.contexts_path)
    order = np.asarray(storage.read_numpy(spec.orders_path)[spec.seed_index])
    if tokens.shape[1] != shape.seq_len + 1:
        raise ValueError(f"{spec.contexts_path} holds contexts of {tokens.shape[1]} tokens but the {shape.name} LM "
                         f"needs {shape.seq_len + 1}: rematerialize tokenized_corpus")
    model, optimizer, step, resumed_from = _start(storage, spec, device)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    history: list[dict[str, float]] = []
    curve_path = f"{spec.run_dir}/{CURVE_FILE}"
    if resumed_from and storage.exists(curve_path):
        history = [r for r in storage.read_json(curve_path) if r["step"] <= resumed_from]
    tokens_per_step = spec.batch_size * shape.seq_len
    micro_batch = lm.default_micro_batch(shape.seq_len, device)
    batches = corpus_batches(tokens, order, spec.batch_size, step - spec.start_step, rank, world)
    started, trained_steps, checkpoints = time.perf_counter(), 0, []
    while step < spec.total_steps:
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the corpus order holds {len(order) // spec.batch_size} batches, fewer than the "
                             f"{spec.total_steps - spec.start_step} this run needs")
        result = lm.train_step(trained, optimizer, batch.to(device), cfg, lr=lm.lr_at(step, cfg),
                               micro_batch=micro_batch)
        if world > 1:
            losses = torch.tensor([result["loss"], result["ce"]], device=device)
            torch.distributed.all_reduce(losses)
            result["loss"], result["ce"] = (losses / world).tolist()
        step, trained_steps = step + 1, trained_steps + 1
        history.append({"step": step, "tokens_seen": step * tokens_per_step, **result})
        failpoints.hit("pretrain.step")
        if step % spec.checkpoint_every == 0 or step == spec.total_steps:
            if rank == 0:
                # the curve first: a resumed run keeps its rows up to the checkpoint it resumes from, so a curve
                # ahead of the checkpoints is harmless, while one behind would lose the rows in between
                storage.write_json(curve_path, history)
                save_checkpoint_to(storage, checkpoint_dir(spec.run_dir, step), model, optimizer, shape, cfg, step,
                                   {**spec.extra, "tokens_seen": step * tokens_per_step,
                                    "seed_index": spec.seed_index, "start_step": spec.start_step})
            if world > 1:
                torch.distributed.barrier()
            checkpoints.append(step)
            log(f"step {step}/{spec.total_steps}: loss {result['loss']:.3f}, "
                f"{time.perf_counter() - started:.0f} s; checkpoint {checkpoint_dir(spec.run_dir, step)}")
    seconds = time.perf_counter() - started
    return RunResult(run_dir=spec.run_dir, start_step=spec.start_step, resumed_from=resumed_from, final_step=step,
                     checkpoints=checkpoints, curve=history, seconds=seconds,
                     tokens_per_second=round(trained_steps * tokens_per_step / seconds, 1) if trained_steps else None)


def saved_checkpoints(storage: Storage, run_dir: str) -> list[int]:
    """Steps of the complete checkpoints of a run, ascending."""
    return sorted(int(name.split("-")[1]) for name in storage.list(run_dir) if name.startswith("step-")
                  and storage.exists(f"{run_dir}/{name}/{STATE_FILE}"))
