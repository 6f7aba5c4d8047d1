"""Cluster-based greedy group selection (method.md 3.7-3.8) and the baselines it is compared with.

Inside each cluster, step i picks the unselected candidate with the most beneficial (lowest) predicted marginal
influence given what the cluster has already selected, by the closed form

    score(x | S) = u_x                                   (S empty)
    score(x | S) = alpha * u_x * (1 - <h_x, mean_S h> / tau)

Ties go to the first candidate in the cluster's order (clusters are ordered by doc_id, so the input's row order
never matters). The reference code did one matrix-vector product per step; here each cluster's Gram matrix is
computed once (one matrix product), a step then only adds one of its rows to a running sum of similarities, and
clusters of similar size are stepped together as one padded batch (on the GPU when present).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from groupmates_assets.lib import failpoints


def cluster_budgets(sizes: np.ndarray, ratio: float, rounding: str = "floor") -> np.ndarray:
    """Documents selected per cluster: floor(r|C|) (reference code) or ceil(r|C|) (paper)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio}")
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"budget rounding must be 'floor' or 'ceil', got {rounding!r}")
    exact = np.asarray(sizes, dtype=np.float64) * ratio
    budgets = np.floor(exact + 1e-9) if rounding == "floor" else np.ceil(exact - 1e-9)
    return np.minimum(budgets.astype(np.int64), np.asarray(sizes, dtype=np.int64))


@dataclass(frozen=True)
class ClusterSelection:
    """For every selected document (in greedy order within each cluster): its row, cluster, rank and scores."""

    rows: np.ndarray  # row into the arrays passed in
    cluster: np.ndarray
    rank: np.ndarray  # 0 = picked first inside its cluster
    predicted: np.ndarray  # predicted marginal influence at the time it was picked

    def __len__(self) -> int:
        return len(self.rows)


def _cluster_batches(sizes: np.ndarray, max_elements: int) -> Iterator[np.ndarray]:
    """Clusters (by id) grouped by similar size so a padded [clusters, m, m] Gram batch stays under a budget."""
    order = np.argsort(-sizes, kind="stable")
    start = 0
    while start < len(order):
        width = max(1, int(sizes[order[start]]))
        count = max(1, max_elements // (width * width))
        yield order[start:start + count]
        start += count


def select_in_clusters(h: np.ndarray | torch.Tensor, u: np.ndarray | torch.Tensor, clusters: np.ndarray,
                       budgets: dict[int, int] | np.ndarray, alpha: float, tau: float,
                       device: str | torch.device = "cpu", max_elements: int = 1 << 26,
                       dtype: torch.dtype = torch.float32) -> ClusterSelection:
    """Greedy selection inside every cluster. ``clusters[i]`` is row i's cluster id; rows of one cluster are
    taken in their given order (pass them sorted by doc_id). ``budgets[c]`` documents are chosen in cluster c.
    h and u stay in host memory; only one padded batch of clusters at a time goes to ``device``, so a GPU never
    holds the whole pool. ``predicted`` is float32 for a half-precision ``dtype`` (NumPy has no bfloat16)."""
    h = torch.as_tensor(h).detach().to(device="cpu", dtype=dtype)
    u = torch.as_tensor(u).detach().to(device="cpu", dtype=dtype)
    clusters = np.asarray(clusters, dtype=np.int64)
    ids, sizes = np.unique(clusters, return_counts=True)
    members = np.split(np.argsort(clusters, kind="stable"), np.cumsum(sizes)[:-1]) if len(ids) else []
    wanted = np.array([int(budgets[c]) for c in ids], dtype=np.int64)
    if np.any(wanted < 0) or np.any(wanted > sizes):
        raise ValueError("every cluster budget must lie between 0 and the cluster's size")
    out_rows, out_cluster, out_rank, out_pred = [], [], [], []
    for batch in _cluster_batches(sizes, max_elements):
        rows, picked, scores = _select_batch([members[i] for i in batch], wanted[batch], h, u, alpha, tau,
                                              max_elements, torch.device(device))
        failpoints.hit("select.cluster_batch")
        for position, cluster_index in enumerate(batch):
            count = int(wanted[cluster_index])
            out_rows.append(rows[position][picked[position, :count]])
            out_cluster.append(np.full(count, ids[cluster_index], dtype=np.int64))
            out_rank.append(np.arange(count, dtype=np.int64))
            out_pred.append(scores[position, :count])
    if not out_rows:
        empty = np.zeros(0, dtype=np.int64)
        return ClusterSelection(empty, empty, empty, np.zeros(0, dtype=np.float32))
    order = np.lexsort((np.concatenate(out_rank), np.concatenate(out_cluster)))
    return ClusterSelection(np.concatenate(out_rows)[order], np.concatenate(out_cluster)[order],
                            np.concatenate(out_rank)[order], np.concatenate(out_pred)[order])


def _select_batch(members: Sequence[np.ndarray], budgets: np.ndarray, h: torch.Tensor, u: torch.Tensor,
                  alpha: float, tau: float, max_elements: int,
                  device: torch.device) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One padded batch of clusters stepped together on ``device`` (gathered from h, u on the host); returns
    (member rows, picked positions, float32 scores)."""
    count, width = len(members), max(len(m) for m in members)
    index = torch.zeros((count, width), dtype=torch.long)
    valid = torch.zeros((count, width), dtype=torch.bool)
    for i, rows in enumerate(members):
        index[i, :len(rows)] = torch.as_tensor(rows)
        valid[i, :len(rows)] = True
    emb = (h[index] * valid[..., None]).to(device)
    uu, valid = u[index].to(device), valid.to(device)
    # [clusters, m, m]: every similarity the greedy steps will need, unless one cluster alone is too big for it.
    gram = batched_gram(emb) if count * width * width <= max_elements else None
    # score = alpha*u - (alpha*u/tau) * (similarity sum / step); +inf folded into the first term for padding and
    # for what is already picked, so a step is one fused multiply-add, one argmin and two small updates.
    masked_scale = torch.where(valid, alpha * uu, float("inf"))
    slope = alpha * uu / tau
    similarity_sum = torch.zeros((count, width), device=device, dtype=emb.dtype)
    steps = int(budgets.max()) if len(budgets) else 0
    everyone_until = int(budgets.min()) if len(budgets) else 0  # before this step every cluster is selecting
    batch_rows = torch.arange(count, device=device)
    row_offsets = batch_rows * width  # flat row index of (cluster, candidate) = cluster * width + candidate
    flat_gram = gram.view(count * width, width) if gram is not None else None
    active_until = torch.as_tensor(budgets, device=device)
    choices, scores = [], []
    for step in range(steps):
        score = torch.where(valid, uu, float("inf")) if step == 0 else torch.addcmul(
            masked_scale, slope, similarity_sum, value=-1.0 / step)
        choice = score.argmin(dim=1)  # first index among equal minima
        choices.append(choice)
        scores.append(score.gather(1, choice[:, None]))
        if step < everyone_until:
            flat = row_offsets + choice
            masked_scale.view(-1).index_fill_(0, flat, float("inf"))
            similarity_sum.add_(flat_gram.index_select(0, flat) if flat_gram is not None else torch.einsum(
                "cmd,cd->cm", emb, emb[batch_rows, choice]))  # gram rows: it is symmetric
        else:
            live = step < active_until
            rows, chosen = batch_rows[live], choice[live]
            masked_scale[rows, chosen] = float("inf")
            similarity_sum[rows] += gram[rows, chosen] if gram is not None else torch.einsum(
                "cmd,cd->cm", emb[rows], emb[rows, chosen])
    if not choices:
        empty = np.zeros((count, 0))
        return list(members), empty.astype(np.int64), empty
    # numpy has no bfloat16: half-precision scores leave as float32 (float64 stays float64).
    scores_out = torch.cat(scores, 1).to(torch.promote_types(emb.dtype, torch.float32))
    return list(members), torch.stack(choices, 1).cpu().numpy(), scores_out.cpu().numpy()


def batched_gram(emb: torch.Tensor) -> torch.Tensor:
    """[C, m, m] Gram matrices in one batched matrix product (NumPy's on the CPU, where it is the faster one, for
    the dtypes NumPy has; torch's otherwise, e.g. bfloat16)."""
    if emb.device.type == "cpu" and emb.dtype in (torch.float32, torch.float64):
        data = emb.numpy()
        return torch.from_numpy(np.matmul(data, data.transpose(0, 2, 1)))
    return emb @ emb.transpose(1, 2)


def select_reference_loop(h: np.ndarray, u: np.ndarray, clusters: np.ndarray, budgets: dict[int, int] | np.ndarray,
                          alpha: float, tau: float, dtype: type = np.float32) -> ClusterSelection:
    """The reference code's structure (select_indices.py): cluster by cluster, one matrix-vector product per
    greedy step against the running ``avg_rel``. Kept as the baseline for benchmarks and equivalence tests."""
    h, u = np.asarray(h, dtype=dtype), np.asarray(u, dtype=dtype)
    rows_out, cluster_out, rank_out, pred_out = [], [], [], []
    for cluster in np.unique(clusters):
        idx = np.flatnonzero(clusters == cluster)
        hc, uc = h[idx], u[idx]
        avg_rel = np.zeros(len(idx), dtype=dtype)
        chosen = np.zeros(len(idx), dtype=bool)
        for i in range(int(budgets[cluster])):
            s = uc.copy() if i == 0 else avg_rel * uc
            s[chosen] = np.inf
            j = int(np.argmin(s))
            rows_out.append(idx[j])
            cluster_out.append(cluster)
            rank_out.append(i)
            pred_out.append(s[j])
            chosen[j] = True
            avg_rel = (i * avg_rel + alpha * (1 - hc @ hc[j] / tau)) / (i + 1)
    return ClusterSelection(np.array(rows_out, dtype=np.int64), np.array(cluster_out, dtype=np.int64),
                            np.array(rank_out, dtype=np.int64), np.array(pred_out, dtype=np.float32))


def full_greedy(h: np.ndarray, u: np.ndarray, budget: int, alpha: float, tau: float) -> np.ndarray:
    """Un-clustered greedy (method.md 3.7) with the closed form: rows in selection order."""
    h, u = np.asarray(h, dtype=np.float64), np.asarray(u, dtype=np.float64)
    chosen, total = [], np.zeros(h.shape[1])
    available = np.ones(len(u), dtype=bool)
    for i in range(budget):
        score = u if i == 0 else alpha * u * (1 - h @ (total / i) / tau)
        score = np.where(available, score, np.inf)
        j = int(np.argmin(score))
        chosen.append(j)
        available[j] = False
        total += h[j]
    return np.array(chosen, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ baselines


def top_k(scores: np.ndarray, budget: int, lowest: bool) -> np.ndarray:
    """Rows of the ``budget`` best scores (ties by row order): lowest u for influence, highest P(hq) for fastText."""
    key = np.asarray(scores, dtype=np.float64) if lowest else -np.asarray(scores, dtype=np.float64)
    return np.argsort(key, kind="stable")[:budget]


def random_subset(count: int, budget: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, size=budget, replace=False))


def clusters_for(documents: int, mean_cluster_size: int) -> int:
    """k from a target mean cluster size (paper: 10,000 clusters for 29.5M documents, ~2,950 each)."""
    if documents <= 0:
        raise ValueError("no documents to cluster")
    return max(1, min(documents, math.ceil(documents / max(1, mean_cluster_size))))
