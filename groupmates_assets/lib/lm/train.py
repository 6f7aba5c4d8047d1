"""Loss, optimiser, LR schedule and the single training step shared by pretraining and oracle probes.

The probe step (method spec §3.1, Stage 5 "one training step") must be exactly a pretraining step: CE + z-loss,
grad-norm clip, AdamW with the hyper-parameters and moments stored in the optimiser. So both use ``train_step``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from groupmates_assets.lib.lm.model import autocast_for, model_device


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + warmup/cosine schedule. Defaults are DCLM's 411m_4x run (the released Group-MATES probe)."""

    lr: float = 3e-3
    weight_decay: float = 0.033
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 2000
    total_steps: int = 31403
    final_lr: float = 3e-5  # DCLM's "cooldown end": the cosine floor
    grad_clip: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    z_loss: float = 1e-4
    # DCLM/open_lm decay every parameter (their no-decay group is built but left empty); keep that by default
    # so a probe step matches the pretraining step. True moves 1-D params (norm gains, biases) to the wd=0 group.
    no_decay_1d: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        return cls(**data)


def lm_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    z_loss_weight: float = 1e-4,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token ``(CE + z_loss_weight * mean(logsumexp^2), CE)`` on ``tokens`` [B, L+1], as open_lm's
    ``CrossEntropyLossWithZLoss``: inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.

    ``loss_mask`` ([B, L+1], aligned with ``tokens``; True = this token counts as a target) excludes padded
    targets from both terms. open_lm averages the z-loss over all positions; with no mask that is identical.
    Logits are upcast to fp32 before the softmax (what autocast does for open_lm's CE). The z-term is the mean of
    squared log-partitions as in current open_lm (one older revision squared the mean instead).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, L+1] with L >= 1, got {tuple(tokens.shape)}")
    device = model_device(model)
    tokens = tokens.to(device=device, dtype=torch.long)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with autocast_for(device):
        logits = model(input_ids=inputs).logits
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [B, L]
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_ce = lse - target_logit
    if loss_mask is None:
        ce = token_ce.mean()
        z = lse.square().mean()
    else:
        valid = loss_mask.to(device=device, dtype=torch.bool)[:, 1:]
        if not bool(valid.any()):
            raise ValueError("loss_mask leaves no target tokens")
        ce = token_ce[valid].mean()
        z = lse[valid].square().mean()
    return ce + z_loss_weight * z, ce


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with DCLM's two param groups ``[no-decay, decay]`` (the no-decay group is empty unless
    ``cfg.no_decay_1d``), so a saved optimiser state has the same layout as DCLM's."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.no_decay_1d:
        no_decay = [p for _, p in params if p.dim() < 2]
        decay = [p for _, p in params if p.dim() >= 2]
    else:
        no_decay, decay = [], [p for _, p in params]
    # The fused kernel is ~2.5x faster than the per-tensor loop on CPU (a probe step is dominated by the 50k-vocab
    # embedding/head); same maths as torch's AdamW, and it exists for CPU and CUDA fp32 params.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for _, p in params)
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_at(step: int, cfg: OptimConfig) -> float:
    """open_lm's ``cosine_lr``: linear warmup ``lr*(step+1)/warmup`` then cosine from lr to final_lr at
    ``total_steps`` (held at final_lr afterwards). ``step`` is 0-based: the LR used by the step-th update."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = cfg.total_steps - cfg.warmup_steps
    if span <= 0:
        return cfg.final_lr
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the (last) param group: the decayed group, which always holds parameters."""
    return float(optimizer.param_groups[-1]["lr"])


# Tokens per forward/backward pass on a GPU (8 sequences of 2048). A whole DCLM batch (512 x 2048) in one pass
# would need > 100 GB for the fp32 logits alone; bench/bench_pretrain_gpu.py measures the peak at this size.
CUDA_MICRO_BATCH_TOKENS = 16_384


def default_micro_batch(seq_len: int, device: torch.device | str) -> int | None:
    """Sequences per forward/backward pass for ``train_step``: None (the whole batch at once) off CUDA, where
    batches are small; on CUDA as many as fit ``CUDA_MICRO_BATCH_TOKENS``."""
    if torch.device(device).type != "cuda":
        return None
    return max(1, CUDA_MICRO_BATCH_TOKENS // int(seq_len))


def _backward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    z_loss_weight: float,
    loss_mask: torch.Tensor | None,
    micro_batch: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the whole batch's loss, accumulated over passes of at most ``micro_batch`` rows; returns the
    detached (loss, ce). Each pass is weighted by its share of the target tokens, so the sum of the passes is
    the batch's token mean (CE and z-loss alike), equal to one pass up to float rounding."""
    rows = tokens.shape[0]
    size = rows if micro_batch is None else max(1, int(micro_batch))
    if size >= rows:
        loss, ce = lm_loss(model, tokens, z_loss_weight=z_loss_weight, loss_mask=loss_mask)
        loss.backward()
        return loss.detach(), ce.detach()
    parts = [slice(start, min(start + size, rows)) for start in range(0, rows, size)]
    if loss_mask is None:
        counts = [part.stop - part.start for part in parts]
    else:
        valid = loss_mask[:, 1:].to(dtype=torch.bool)
        counts = [int(valid[part].sum()) for part in parts]
    total = sum(counts)
    if total == 0:
        raise ValueError("loss_mask leaves no target tokens")
    # DDP: all-reduce once, in the backward of the last pass, not once per pass.
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    last = max(i for i, count in enumerate(counts) if count)
    loss_sum = ce_sum = torch.zeros((), dtype=torch.float32, device=model_device(model))
    for i, (part, count) in enumerate(zip(parts, counts, strict=True)):
        if count == 0:  # a part with no targets adds nothing (lm_loss would reject it)
            continue
        weight = count / total
        with model.no_sync() if ddp and i != last else contextlib.nullcontext():
            loss, ce = lm_loss(model, tokens[part], z_loss_weight=z_loss_weight,
                               loss_mask=None if loss_mask is None else loss_mask[part])
            (loss * weight).backward()
        loss_sum = loss_sum + loss.detach() * weight
        ce_sum = ce_sum + ce.detach() * weight
    return loss_sum, ce_sum


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    cfg: OptimConfig,
    lr: float | None = None,
    loss_mask: torch.Tensor | None = None,
    micro_batch: int | None = None,
) -> dict[str, float]:
    """One update on ``tokens`` [B, L+1]: zero grads, (bf16 autocast on CUDA) loss, backward, clip, AdamW step.

    ``lr=None`` keeps whatever LR the optimiser's param groups hold: the oracle relies on this so that a probe
    step uses the LR saved with the checkpoint's optimiser state. A given ``lr`` is written into the groups.
    ``micro_batch`` (sequences per forward/backward, None = all B at once) accumulates the gradient of a batch too
    big for the GPU in several passes; the update is the same. Returns loss, ce, the pre-clip ``grad_norm`` and
    the ``lr`` used.
    """
    model.train()
    if lr is not None:
        set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss, ce = _backward(model, tokens, cfg.z_loss, loss_mask, micro_batch)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, norm_type=2.0)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    optimizer.step()
    return {"loss": float(loss), "ce": float(ce), "grad_norm": float(grad_norm),
            "lr": current_lr(optimizer)}


def pretrain(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    cfg: OptimConfig,
    start_step: int = 0,
    steps: int | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
    log_every: int = 10,
    tokens_seen: int = 0,
    micro_batch: int | None = None,
) -> list[dict[str, float]]:
    """Train on ``batches`` ([B, L+1] each) from global step ``start_step`` with the scheduled LR.

    Stops after ``steps`` updates or when ``batches`` runs out. Returns the loss curve, one record per step
    (step = global 1-based count after the update, tokens_seen = ``tokens_seen`` + predicted tokens so far).
    ``log`` gets every ``log_every``-th record and the last one. ``micro_batch``: see ``train_step``.
    """
    curve: list[dict[str, float]] = []
    iterator = iter(batches)
    step = start_step
    while steps is None or step < start_step + steps:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        result = train_step(model, optimizer, batch, cfg, lr=lr_at(step, cfg), micro_batch=micro_batch)
        step += 1
        tokens_seen += batch.shape[0] * (batch.shape[1] - 1)
        record = {"step": step, "tokens_seen": tokens_seen, **result}
        curve.append(record)
        if log is not None and (step % max(log_every, 1) == 0):
            log(record)
    if log is not None and curve and curve[-1]["step"] % max(log_every, 1) != 0:
        log(curve[-1])
    return curve
