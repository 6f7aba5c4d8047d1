"""Training the influence model on oracle trajectories (method.md 3.5, with the 7.2 fixes).

MSE on z-scored marginal labels; the z statistics come from the training split only (the reference computed
them over everything, leaking validation into training). The validation split holds out whole trajectories of
every rollout policy, as the reference's split over trajectories does: random ones and both bootstrap tails,
so validation scores the beneficial and the harmful tail alike. The split of each policy depends only on its own
trajectories, so the random-rollout validation set is the same for the initial and the final model and their
metrics are comparable. Model selection by validation Spearman, as the paper.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from groupmates_assets.lib.influence.encoder import ChunkedDocuments
from groupmates_assets.lib.influence.model import InfluenceModel


@dataclass(frozen=True)
class Trajectories:
    """Oracle trajectories as arrays: probe-pool rows, marginal labels, and the policy that drew each."""

    contexts: np.ndarray  # [N, T] int64
    labels: np.ndarray  # [N, T] float64, marginal influences I_t
    policy: np.ndarray  # [N] str: random | bootstrap-beneficial | bootstrap-harmful
    trajectory_id: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.contexts)

    @classmethod
    def from_tables(cls, tables: Sequence[pa.Table]) -> Trajectories:
        table = pa.concat_tables(tables) if tables else None
        if table is None or table.num_rows == 0:
            raise ValueError("no oracle trajectories to train on")
        contexts = np.array(table.column("context_index").to_pylist(), dtype=np.int64)
        labels = np.array(table.column("marginal").to_pylist(), dtype=np.float64)
        if contexts.ndim != 2 or labels.shape != contexts.shape:
            raise ValueError(f"oracle trajectories must all have the same length; got shapes {contexts.shape} "
                             f"and {labels.shape}")
        if not np.isfinite(labels).all():
            raise ValueError("oracle labels hold non-finite values; rerun the oracle block that produced them")
        return cls(contexts, labels, np.array(table.column("policy").to_pylist(), dtype=object),
                   np.array(table.column("trajectory_id").to_pylist(), dtype=np.int64))

    def subset(self, rows: np.ndarray) -> Trajectories:
        return Trajectories(self.contexts[rows], self.labels[rows], self.policy[rows], self.trajectory_id[rows])

    def family(self) -> np.ndarray:
        return np.array([str(p).split("-", 1)[0] for p in self.policy], dtype=object)


def hash_order(rows: np.ndarray, keys: Sequence[str], seed: int) -> np.ndarray:
    """``rows`` sorted by a seeded hash of their keys: a shuffle that does not depend on the input order."""
    digests = [hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest() for key in keys]
    return rows[sorted(range(len(rows)), key=digests.__getitem__)]


# Bootstrap trajectories were once split by beam root; random ones are split as they always were.
BOOTSTRAP_SPLIT = "whole-trajectories-per-tail"


def split_fingerprint(data: Trajectories) -> dict[str, str]:
    """What a model's fingerprint records of the split: the bootstrap split scheme when there are bootstrap
    trajectories, nothing otherwise (so a random-only model keeps its fingerprint)."""
    return {"bootstrap_split": BOOTSTRAP_SPLIT} if (data.family() == "bootstrap").any() else {}


def split_by_group(data: Trajectories, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): per rollout policy (random, bootstrap-beneficial, bootstrap-harmful), a
    ``val_fraction`` share of its whole trajectories (at least one, never all) in a seeded hash order of the
    trajectory ids. Bootstrap beams of a tail often share a prefix, so the bootstrap validation trajectories can
    share one with training ones, as in the reference's split; random trajectories are independent draws."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_rows: list[np.ndarray] = []
    for policy in sorted(set(data.policy)):
        rows = np.flatnonzero(data.policy == policy)
        ordered = hash_order(rows, [f"{policy}:{tid}" for tid in data.trajectory_id[rows]], seed)
        n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows)))) if val_fraction > 0 else 0
        val_rows.append(ordered[:n_val])
    val = np.sort(np.concatenate(val_rows)).astype(np.int64)
    return np.setdiff1d(np.arange(len(data)), val), val


# ------------------------------------------------------------------------------------------------ metrics


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start + 1
        while end < len(values) and sorted_values[end] == sorted_values[start]:
            end += 1
        ranks[order[start:end]] = (start + end - 1) / 2.0
        start = end
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a, dtype=np.float64).ravel()), _ranks(np.asarray(b, dtype=np.float64).ravel()))


def regression_metrics(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE, MAE, Pearson, Spearman over all positions jointly (z units), plus the constant predictor's MSE."""
    predicted, target = np.asarray(predicted, dtype=np.float64).ravel(), np.asarray(target, dtype=np.float64).ravel()
    return {"mse": float(np.mean((predicted - target) ** 2)), "mae": float(np.mean(np.abs(predicted - target))),
            "pearson": pearson(predicted, target), "spearman": spearman(predicted, target),
            "mse_constant": float(np.mean(target ** 2)), "points": len(target)}


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    epochs: int = 5
    trajectories_per_step: int = 32  # reference code: 32 (8 GPUs x 1 x 4 accumulation); paper: 128
    evals_per_epoch: int = 1
    seed: int = 1234
    max_tokens: int = 16384  # encoder tokens per forward
    grad_clip: float = 1.0


@dataclass
class TrainingResult:
    label_mean: float
    label_std: float
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    trajectories_seen: int = 0
    optimized_parameters: list[str] = field(default_factory=list)  # names of what the trainer's optimizer updates

    @property
    def trajectories_per_second(self) -> float:
        return self.trajectories_seen / self.seconds if self.seconds else 0.0


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero (the paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def predict(model: InfluenceModel, docs: ChunkedDocuments, contexts: np.ndarray, batch: int = 32,
            max_tokens: int = 16384) -> np.ndarray:
    """[N, T] predictions in the model's z units, eval mode."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(contexts), batch):
            out.append(model(docs, contexts[start:start + batch], max_tokens=max_tokens).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, contexts.shape[1]))


def _optimizer(model: InfluenceModel, settings: TrainSettings) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)


def train_model(model: InfluenceModel, docs: ChunkedDocuments, data: Trajectories, train_rows: np.ndarray,
                val_rows: np.ndarray, settings: TrainSettings,
                log: Callable[[str], None] | None = None) -> TrainingResult:
    """Fit ``model`` in place; at the end it holds the weights of the best validation Spearman."""
    if len(train_rows) == 0:
        raise ValueError("the training split is empty; collect more oracle trajectories")
    torch.manual_seed(settings.seed)
    train_labels = data.labels[train_rows]
    mean, std = float(train_labels.mean()), float(train_labels.std()) or 1.0
    model.config.label_mean, model.config.label_std = mean, std
    z = (data.labels - mean) / std
    per_step = max(1, min(settings.trajectories_per_step, len(train_rows)))
    steps_per_epoch = math.ceil(len(train_rows) / per_step)
    total_steps = settings.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // max(1, settings.evals_per_epoch))
    optimizer = _optimizer(model, settings)
    rng = np.random.default_rng(settings.seed)
    result = TrainingResult(mean, std, best_step=0, best_metrics={})
    names = {id(p): name for name, p in model.named_parameters()}
    result.optimized_parameters = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    best_state, best_score, losses = None, -math.inf, []
    started, step = time.perf_counter(), 0
    model.train()
    for _epoch in range(settings.epochs):
        order = rng.permutation(train_rows)
        for start in range(0, len(order), per_step):
            rows = order[start:start + per_step]
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(step, settings.warmup_steps, total_steps)
            target = torch.as_tensor(z[rows], dtype=torch.float32, device=model.device)
            loss = torch.nn.functional.mse_loss(model(docs, data.contexts[rows], settings.max_tokens).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            result.trajectories_seen += len(rows)
            if step % eval_every == 0 or step == total_steps:
                metrics = evaluate(model, docs, data, val_rows, settings.max_tokens)
                alpha, tau = model.alpha_tau()
                entry = {"step": step, "epoch": round(step / steps_per_epoch, 3), "train_mse": float(np.mean(losses)),
                         "alpha": alpha, "tau": tau, **{f"val_{k}": v for k, v in metrics.items()}}
                result.history.append(entry)
                losses = []
                score = metrics.get("spearman", float("nan"))
                score = -math.inf if not np.isfinite(score) else score
                if best_state is None or score > best_score or len(val_rows) == 0:  # no validation: keep the last
                    best_state, best_score = copy.deepcopy(model.state_dict()), score
                    result.best_step, result.best_metrics = step, metrics
                if log:
                    log(f"step {step}/{total_steps} (epoch {entry['epoch']}): train mse {entry['train_mse']:.4f}, "
                        f"val spearman {metrics.get('spearman', float('nan')):.4f}, val mse "
                        f"{metrics.get('mse', float('nan')):.4f}, alpha {alpha:.4f}, tau {tau:.4f}")
    result.seconds, result.steps = time.perf_counter() - started, step
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def evaluate(model: InfluenceModel, docs: ChunkedDocuments, data: Trajectories, rows: np.ndarray,
             max_tokens: int = 16384) -> dict[str, float]:
    """Metrics in z units on the given trajectories (empty dict when there are none)."""
    if len(rows) == 0:
        return {}
    predicted = predict(model, docs, data.contexts[rows], max_tokens=max_tokens)
    target = (data.labels[rows] - model.config.label_mean) / model.config.label_std
    return regression_metrics(predicted, target)


def comparison_markdown(results: dict[str, dict]) -> str:
    """Markdown table of influence models side by side: held-out metrics on the random-rollout validation set
    (``random_val``) and on the whole one (``all_val``), with each model's alpha and tau; NaN where undefined."""
    rows = [f"| {name} | {r['random_val'].get('spearman', float('nan')):.4f} | "
            f"{r['random_val'].get('pearson', float('nan')):.4f} | {r['all_val'].get('spearman', float('nan')):.4f} | "
            f"{r['all_val'].get('mse', float('nan')):.4f} | {r['all_val'].get('mse_constant', float('nan')):.4f} | "
            f"{r['alpha']:.3f} | {r['tau']:.3f} |" for name, r in results.items()]
    return ("| model | Spearman (random held-out) | Pearson (random held-out) | Spearman (all held-out) | "
            "MSE (all held-out, z) | constant MSE | alpha | tau |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))
