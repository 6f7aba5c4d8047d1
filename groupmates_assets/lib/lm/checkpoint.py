"""Checkpoints (model + optimiser state, on disk) and in-memory snapshots (fast trajectory resets).

A probe checkpoint must carry the optimiser state: the oracle's probe step uses the saved LR, betas and Adam
moments (method spec T11). On disk, a checkpoint directory holds
  ``model.safetensors``   fp32 weights
  ``optimizer.pt``        ``optimizer.state_dict()`` (plain tensors/numbers: loads with ``weights_only=True``)
  ``trainer_state.json``  shape, optimiser config, step, current LR, caller's extra; written last, so its
                          presence marks a complete checkpoint.
Every file is written under a temporary name, fsynced, and moved into place with ``os.replace`` (its folder fsynced
after the rename).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # the error only: nothing here unpickles with pickle itself
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from groupmates_assets.lib import failpoints
from groupmates_assets.lib.lm.model import build_model, default_device
from groupmates_assets.lib.lm.shapes import LMShape
from groupmates_assets.lib.lm.train import OptimConfig, current_lr, make_optimizer
from groupmates_assets.lib.storage import durable_replace, pid_alive

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "groupmates-lm-ckpt-v1"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain values: refused before anything in it runs."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` then rename, so a reader never sees a half-written file."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer killed mid-write
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        failpoints.hit("checkpoint.write.complete")
        durable_replace(str(tmp), str(path))
        failpoints.hit("checkpoint.write.visible")
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shape: LMShape,
    cfg: OptimConfig,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete, exactly-resumable checkpoint into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    if state_path.exists():
        state_path.unlink()  # an interrupted overwrite must read as incomplete
    _atomic_write(directory / MODEL_FILE, lambda tmp: save_model(model, str(tmp), metadata={"format": "pt"}))
    _atomic_write(directory / OPTIMIZER_FILE, lambda tmp: torch.save(optimizer.state_dict(), tmp))
    state = {
        "format": CHECKPOINT_FORMAT,
        "shape": shape.to_dict(),
        "optim": cfg.to_dict(),
        "step": int(step),
        "lr": current_lr(optimizer),
        "extra": extra or {},
    }
    payload = json.dumps(state, indent=2, sort_keys=True).encode()
    _atomic_write(state_path, lambda tmp: tmp.write_bytes(payload))
    return directory


def read_trainer_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON state of a complete checkpoint (raises FileNotFoundError if incomplete)."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_optimizer_state(path: str | os.PathLike[str], device: torch.device | str) -> dict[str, Any]:
    """An ``optimizer.pt`` read with ``weights_only=True``: only tensors, numbers, strings and containers come back.
    A file that names any other object (a tampered or foreign checkpoint, whose full unpickling could run code)
    raises :class:`UnsafeCheckpointError` naming the file and the object; nothing in it is executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        what = (f"names {named.group(1)}, not only tensors and plain values" if named
                else "holds objects other than tensors and plain values")
        raise UnsafeCheckpointError(
            f"refusing to load {os.fspath(path)}: it {what}, so it was not written by this pipeline (checkpoints "
            "load with weights_only=True only; never load this one with weights_only=False)"
        ) from None


def load_checkpoint(
    directory: str | os.PathLike[str], device: torch.device | str | None = None
) -> tuple[torch.nn.Module, torch.optim.AdamW, dict[str, Any]]:
    """Rebuild model and optimiser exactly as saved; ``state`` is the trainer_state.json content, with
    ``shape`` and ``optim`` also parsed into ``state["lm_shape"]`` / ``state["optim_config"]``."""
    directory = Path(directory)
    device = torch.device(device) if device is not None else default_device()
    state = read_trainer_state(directory)
    shape = LMShape.from_dict(state["shape"])
    cfg = OptimConfig.from_dict(state["optim"])
    model = build_model(shape, device=device, initialize=False)
    load_model(model, str(directory / MODEL_FILE), strict=True, device=str(device))
    optimizer = make_optimizer(model, cfg)
    osd = load_optimizer_state(directory / OPTIMIZER_FILE, device)
    optimizer.load_state_dict(osd)
    state["lm_shape"] = shape
    state["optim_config"] = cfg
    return model, optimizer, state


def load_weights(
    directory: str | os.PathLike[str], device: torch.device | str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a complete checkpoint without its optimiser state (evaluation needs only the weights)."""
    directory = Path(directory)
    device = torch.device(device) if device is not None else default_device()
    state = read_trainer_state(directory)
    model = build_model(LMShape.from_dict(state["shape"]), device=device, initialize=False)
    load_model(model, str(directory / MODEL_FILE), strict=True, device=str(device))
    return model, state


@dataclass
class Snapshot:
    """Copies of parameters, buffers, per-parameter optimiser state and param-group hyper-parameters."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    optim_state: list[dict[str, Any] | None]  # aligned with the optimiser's params; None = no state yet
    group_hparams: list[dict[str, Any]] = field(default_factory=list)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}


@torch.no_grad()
def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    """Clone everything a training step can change, on the same device (one extra copy of weights + moments)."""
    optim_state = []
    for p in _optimizer_params(optimizer):
        state = optimizer.state.get(p)
        optim_state.append(_clone_state(state) if state else None)
    return Snapshot(
        params=[p.detach().clone() for p in model.parameters()],
        buffers=[b.detach().clone() for b in model.buffers()],
        optim_state=optim_state,
        group_hparams=[{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    )


@torch.no_grad()
def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, snap: Snapshot) -> None:
    """Put model and optimiser back to ``snap`` in place (``copy_``; allocates only for state that the snapshot
    has and the optimiser lost). Gradients are dropped so nothing stale survives the reset."""
    params = list(model.parameters())
    if len(params) != len(snap.params):
        raise ValueError("snapshot does not belong to this model")
    for p, saved in zip(params, snap.params, strict=True):
        p.copy_(saved)
        p.grad = None
    for b, saved in zip(model.buffers(), snap.buffers, strict=True):
        b.copy_(saved)
    opt_params = _optimizer_params(optimizer)
    if len(opt_params) != len(snap.optim_state):
        raise ValueError("snapshot does not belong to this optimizer")
    for p, saved_state in zip(opt_params, snap.optim_state, strict=True):
        if saved_state is None:
            optimizer.state.pop(p, None)
            continue
        current = optimizer.state.get(p)
        if not current or current.keys() != saved_state.keys():
            optimizer.state[p] = _clone_state(saved_state)
            continue
        for key, value in saved_state.items():
            if isinstance(value, torch.Tensor) and isinstance(current[key], torch.Tensor):
                current[key].copy_(value)
            else:
                current[key] = copy.deepcopy(value)
    for group, hparams in zip(optimizer.param_groups, snap.group_hparams, strict=True):
        group.update(copy.deepcopy(hparams))
