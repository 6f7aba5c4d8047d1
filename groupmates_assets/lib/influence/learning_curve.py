"""How much oracle data is enough: validation Spearman of an influence model against the number of oracle
trajectories it trained on.

Each curve point below 100% trains a fresh model, with the same recipe, on a nested, seeded subset of the training
split (every policy in proportion) and scores it on the same validation split; the 100% point is the model the
pipeline trained, never retrained. A curve still rising at 100% says more oracle trajectories would pay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from groupmates_assets.lib import plots
from groupmates_assets.lib.influence.encoder import ChunkedDocuments
from groupmates_assets.lib.influence.model import InfluenceModel
from groupmates_assets.lib.influence.training import TrainSettings, Trajectories, evaluate, hash_order, train_model


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions below 100% in increasing order; each must lie in (0, 1) and appear once."""
    for fraction in fractions:
        if not (isinstance(fraction, int | float) and 0 < fraction < 1):
            raise ValueError(f"learning-curve fractions must lie in (0, 1) (100% is the trained model itself), "
                             f"got {fraction!r}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"learning-curve fractions repeat: {list(fractions)}")
    return tuple(sorted(fractions))


def nested_subsets(data: Trajectories, train_rows: np.ndarray, fractions: Sequence[float],
                   seed: int) -> dict[float, np.ndarray]:
    """Per fraction, that share of every policy's training trajectories (at least one of each), taken from one
    seeded hash order per policy, so a smaller subset is inside every larger one and the order of the input rows
    does not matter."""
    ordered = {}
    for policy in sorted(set(data.policy[train_rows])):
        rows = train_rows[data.policy[train_rows] == policy]
        ordered[policy] = hash_order(rows, [f"curve:{policy}:{tid}" for tid in data.trajectory_id[rows]], seed)
    return {fraction: np.sort(np.concatenate([rows[:max(1, round(fraction * len(rows)))]
                                              for rows in ordered.values()])).astype(np.int64)
            for fraction in check_fractions(fractions)}


def _point(fraction: float, trajectories: int, all_val: dict, random_val: dict, seconds: float,
           retrained: bool) -> dict[str, Any]:
    return {"fraction": fraction, "trajectories": trajectories, "retrained": retrained,
            "seconds": round(seconds, 2), "all_val": all_val, "random_val": random_val}


def learning_curve(new_model: Callable[[], InfluenceModel], docs: ChunkedDocuments, data: Trajectories,
                   train_rows: np.ndarray, val_rows: np.ndarray, fractions: Sequence[float], settings: TrainSettings,
                   trained: dict[str, dict], log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Curve points in increasing fraction: below 100% a model from ``new_model()`` trained on a nested subset;
    at 100% ``trained``, the pipeline's model already scored on the same split (``all_val`` and ``random_val``
    metrics). Every point holds the metrics on all held-out trajectories and on the random-rollout ones."""
    random_val = val_rows[data.family()[val_rows] == "random"]
    points = []
    for fraction, rows in nested_subsets(data, train_rows, fractions, settings.seed).items():
        started = time.perf_counter()
        model = new_model()
        all_val = train_model(model, docs, data, rows, val_rows, settings).best_metrics  # kept weights' metrics
        on_random = evaluate(model, docs, data, random_val, settings.max_tokens)
        points.append(_point(fraction, len(rows), all_val, on_random, time.perf_counter() - started, True))
        if log:
            log(f"{fraction:.0%} of the training trajectories ({len(rows)}): validation Spearman "
                f"{all_val.get('spearman', float('nan')):.4f}")
    points.append(_point(1.0, len(train_rows), trained["all_val"], trained["random_val"], 0.0, False))
    return points


def _spearman(metrics: dict[str, float]) -> float:
    return metrics.get("spearman", float("nan"))


def curves_markdown(curves: dict[str, list[dict[str, Any]]]) -> str:
    """One row per model and curve point: trajectories trained on, Spearman on all and on the random held-out
    trajectories, held-out MSE, and the seconds the point's training took (0: the trained model, reused)."""
    rows = [f"| {name} | {p['fraction']:.0%} | {p['trajectories']} | {_spearman(p['all_val']):.4f} | "
            f"{_spearman(p['random_val']):.4f} | {p['all_val'].get('mse', float('nan')):.4f} | {p['seconds']:.1f} |"
            for name, points in curves.items() for p in points]
    return ("| model | share of training trajectories | trajectories | Spearman (all held-out) | "
            "Spearman (random held-out) | MSE (all held-out, z) | seconds |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))


def curves_png(curves: dict[str, list[dict[str, Any]]]) -> bytes:
    """Validation Spearman (all held-out trajectories) against the training trajectories, one line per model."""
    series = {name: ([p["trajectories"] for p in points], [_spearman(p["all_val"]) for p in points])
              for name, points in curves.items()}
    return plots.lines_png(series, "influence models: held-out Spearman against oracle trajectories",
                           "training trajectories", "validation Spearman", hline=(0.0, "no correlation"))
