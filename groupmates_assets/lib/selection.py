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

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from groupmates_assets.lib import budgets, failpoints
from groupmates_assets.lib.storage import Storage


def range_bounds(range_key: str, k: int) -> tuple[int, int]:
    """Cluster ids [start, stop) of a range partition ``clusters-III-of-NNN``."""
    parts = range_key.split("-")
    if len(parts) != 4 or parts[0] != "clusters" or parts[2] != "of" or not all(
            p.isascii() and p.isdigit() for p in (parts[1], parts[3])):
        raise ValueError(f"not a cluster range key: {range_key!r}")
    index, ranges = int(parts[1]), int(parts[3])
    return index * k // ranges, (index + 1) * k // ranges


def all_range_bounds(k: int, ranges: int) -> list[tuple[int, int]]:
    """[start, stop) of every range partition ``clusters-III-of-<ranges>``, in order (as :func:`range_bounds`)."""
    return [(index * k // ranges, (index + 1) * k // ranges) for index in range(ranges)]


def cluster_sizes(assignments: Iterable[pa.Table], k: int) -> np.ndarray:
    """Documents per cluster id over shards' assignments (tables with a ``cluster`` column), summed one table at
    a time: given a generator over shards, only one shard's column is in memory."""
    sizes = np.zeros(k, dtype=np.int64)
    for table in assignments:
        counts = np.bincount(table.column("cluster").to_numpy(), minlength=k)
        if len(counts) > k:
            raise ValueError(f"cluster id {len(counts) - 1} outside the {k} clusters; rematerialize "
                             "cluster_assignments for the current cluster_centroids")
        sizes += counts
    return sizes


def cluster_budgets(sizes: np.ndarray, ratio: float, rounding: str = "floor") -> np.ndarray:
    """Documents selected per cluster: floor(r|C|) (reference code) or ceil(r|C|) (paper)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio}")
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"budget rounding must be 'floor' or 'ceil', got {rounding!r}")
    exact = np.asarray(sizes, dtype=np.float64) * ratio
    budgets = np.floor(exact + 1e-9) if rounding == "floor" else np.ceil(exact - 1e-9)
    return np.minimum(budgets.astype(np.int64), np.asarray(sizes, dtype=np.int64))


def total_budget(sizes: np.ndarray, ratio: float, rounding: str = "floor") -> int:
    """Group-MATES' total selection size: the baselines select exactly as many documents."""
    return int(cluster_budgets(sizes, ratio, rounding).sum())


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


def doc_uniforms(doc_ids: Sequence[str] | pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """A seeded uniform number in (0, 1) for every doc_id, from blake2b of the seed and the id alone: a document
    draws the same number whatever its shard, its position or the order the pool is read in, so a baseline can
    sample while it streams over the shards (the same draws as over the whole pool at once)."""
    ids = doc_ids.to_pylist() if isinstance(doc_ids, pa.Array | pa.ChunkedArray) else doc_ids
    prefix = f"{int(seed)}:".encode()
    digests = b"".join(hashlib.blake2b(prefix + doc_id.encode(), digest_size=8).digest() for doc_id in ids)
    words = np.frombuffer(digests, dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # 53 random bits, never 0 or 1


def gumbel_keys(scores: np.ndarray, doc_ids: Sequence[str] | pa.Array | pa.ChunkedArray, temperature: float,
                seed: int, lowest: bool = True) -> np.ndarray:
    """MATES' Gumbel-top-k as sort keys (the ``budget`` smallest are selected): ``scores + temperature * g``
    (``-scores`` for highest-first scores), g standard Gumbel noise from each doc_id's seeded uniform
    (:func:`doc_uniforms`); the same order as MATES' ``scores / temperature + noise`` (``select_data.py``), a
    sample without replacement that still favours the best scores. Temperature 0 gives the scores themselves
    (:func:`top_k` exactly); a large one approaches a uniform sample."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"the Gumbel-top-k temperature must be a finite number >= 0, got {temperature!r}")
    keys = np.asarray(scores, dtype=np.float64) if lowest else -np.asarray(scores, dtype=np.float64)
    if temperature == 0:
        return keys
    return keys + temperature * -np.log(-np.log(doc_uniforms(doc_ids, seed)))


def clusters_for(documents: int, mean_cluster_size: int) -> int:
    """k from a target mean cluster size (paper: 10,000 clusters for 29.5M documents, ~2,950 each)."""
    if documents <= 0:
        raise ValueError("no documents to cluster")
    return max(1, min(documents, math.ceil(documents / max(1, mean_cluster_size))))


# ------------------------------------------------------------------------------------ the pool's embeddings


def embeddings(table: pa.Table) -> np.ndarray:
    """The float16 ``h`` column of pool predictions as a float32 [documents, dim] matrix."""
    column = table.column("h").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def sample_embeddings(storage: Storage, paths: dict[str, str], counts: dict[str, int], budget: int,
                      seed: int) -> np.ndarray:
    """A seeded uniform sample of at most ``budget`` embeddings over all shards, read shard by shard, so memory
    holds one shard and the sample, never the whole pool."""
    total = sum(counts.values())
    rows = np.sort(np.random.default_rng(seed).choice(total, size=budget, replace=False)) if total > budget \
        else np.arange(total)
    parts, offset = [], 0
    for key, path in paths.items():
        mine = rows[(rows >= offset) & (rows < offset + counts[key])] - offset
        if len(mine):
            parts.append(embeddings(storage.read_parquet(path, columns=["h"]).take(pa.array(mine))))
        offset += counts[key]
    if not parts:
        raise ValueError("no documents to cluster: every shard of the filtered pool is empty")
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------- a range of clusters


@dataclass(frozen=True)
class Candidates:
    """The documents of a range of clusters, gathered over every shard and sorted by doc_id."""

    doc_id: np.ndarray  # object (str)
    shard: np.ndarray  # object (str)
    cluster: np.ndarray
    h: np.ndarray  # [documents, dim] float32
    u: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_id)


def sorted_by_cluster(table: pa.Table) -> pa.Table:
    """A shard's assignments in the order they are stored: by cluster id, then doc_id (so equal input gives equal
    bytes, whatever the predictions' row order)."""
    return table.sort_by([("cluster", "ascending"), ("doc_id", "ascending")])


def range_row_groups(clusters: np.ndarray, bounds: Sequence[tuple[int, int]]) -> list[int]:
    """Rows per Parquet row group for assignments sorted by cluster: one group per range of ``bounds`` that holds
    rows, so a range partition reads its own group of every shard and nothing of the others."""
    cuts = np.searchsorted(np.asarray(clusters), [start for start, _ in bounds[1:]], side="left")
    counts = np.diff(np.concatenate([[0], cuts, [len(clusters)]]))
    return [int(count) for count in counts if count]


def gather_candidates(assignments: dict[str, pa.Table], predictions: dict[str, pa.Table] | None, start: int,
                      stop: int) -> Candidates:
    """The documents assigned to clusters [start, stop) with their h and u, shard by shard (in the order of
    ``assignments``); sorted by doc_id, so a cluster's order never depends on the input's. With ``predictions``
    h and u are joined from them by doc_id; with None they are the assignments' own columns (the layout
    cluster_assignments writes, so a range reads nothing but its own rows)."""
    doc_ids, shards, clusters, hs, us = [], [], [], [], []
    for key, table in assignments.items():
        mask = pc.and_(pc.greater_equal(table.column("cluster"), start), pc.less(table.column("cluster"), stop))
        chosen = table.filter(mask)
        if chosen.num_rows == 0:
            continue
        if predictions is None:
            picked = chosen
        else:
            pred = predictions[key]
            rows = pc.index_in(chosen.column("doc_id"), value_set=pred.column("doc_id"))
            if rows.null_count:
                raise ValueError(f"shard {key}: {rows.null_count} assigned documents have no prediction; "
                                 "rematerialize pool_predictions and cluster_assignments for it")
            picked = pred.take(rows)
        doc_ids += chosen.column("doc_id").to_pylist()
        shards += [key] * chosen.num_rows
        clusters.append(chosen.column("cluster").to_numpy())
        hs.append(embeddings(picked))
        us.append(picked.column("u").to_numpy())
    if not doc_ids:
        return Candidates(np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int64), np.zeros((0, 1)),
                          np.zeros(0))
    order = np.argsort(np.array(doc_ids, dtype=object), kind="stable")
    return Candidates(np.array(doc_ids, dtype=object)[order], np.array(shards, dtype=object)[order],
                      np.concatenate(clusters)[order], np.concatenate(hs)[order], np.concatenate(us)[order])


def split_by_shard(table: pa.Table, keys: Sequence[str]) -> dict[str, pa.Table]:
    """The rows of every shard in ``keys`` (an empty table for a shard without rows), each in the table's order;
    rows of a shard outside ``keys`` are an error."""
    ordered = table.take(pc.sort_indices(table, sort_keys=[("shard", "ascending")]))  # a stable sort
    shards = np.asarray(ordered.column("shard").to_numpy(zero_copy_only=False), dtype=object)
    unknown = set(np.unique(shards).tolist()) - set(keys)
    if unknown:
        raise ValueError(f"rows of shards {sorted(unknown)[:5]} that are not in the filtered pool")
    first = np.searchsorted(shards, list(keys), side="left") if len(shards) else np.zeros(len(keys), np.int64)
    last = np.searchsorted(shards, list(keys), side="right") if len(shards) else np.zeros(len(keys), np.int64)
    return {key: ordered.slice(int(a), int(b - a)) for key, a, b in zip(keys, first, last, strict=True)}


def selected_table(candidates: Candidates, result: ClusterSelection) -> pa.Table:
    """Group-MATES' selection of a range: doc_id, shard, cluster, rank, u, predicted (in greedy order)."""
    return pa.table({
        "doc_id": pa.array(candidates.doc_id[result.rows].tolist(), pa.string()),
        "shard": pa.array(candidates.shard[result.rows].tolist(), pa.string()),
        "cluster": pa.array(result.cluster, pa.int64()), "rank": pa.array(result.rank, pa.int64()),
        "u": pa.array(candidates.u[result.rows], pa.float32()), "predicted": pa.array(result.predicted, pa.float32()),
    })


def prefix(result: ClusterSelection, counts: np.ndarray | dict[int, int]) -> ClusterSelection:
    """The first ``counts[c]`` picks of every cluster c: the selection a smaller budget gives, exactly, because a
    cluster's greedy picks never depend on how many it will make."""
    if not len(result):
        return result
    ids = np.unique(result.cluster)
    wanted = np.array([int(counts[c]) for c in ids], dtype=np.int64)
    keep = result.rank < wanted[np.searchsorted(ids, result.cluster)]
    return ClusterSelection(result.rows[keep], result.cluster[keep], result.rank[keep], result.predicted[keep])


def range_cluster_table(start: int, stop: int, sizes: np.ndarray, uniform: np.ndarray, lengths: np.ndarray,
                        sequences: ClusterSelection) -> pa.Table:
    """One row per cluster of [start, stop) (arrays indexed by cluster id): size, uniform budget, how far its
    greedy sequence was computed and its predicted benefit (``budgets.cluster_benefit``), for the budget
    policies, which read these rows instead of the pool."""
    ids = np.arange(start, stop, dtype=np.int64)
    benefit = budgets.cluster_benefit(sequences.cluster, sequences.rank, sequences.predicted, ids, uniform[start:stop])
    return pa.table({"cluster": pa.array(ids, pa.int64()), "size": pa.array(sizes[start:stop], pa.int64()),
                     "uniform": pa.array(uniform[start:stop], pa.int64()),
                     "sequence_length": pa.array(lengths[start:stop], pa.int64()),
                     "benefit": pa.array(benefit, pa.float64())})


def budgeted_rows(sequences: pa.Table, ids: np.ndarray, counts: np.ndarray) -> pa.Table:
    """The rows of a range's greedy sequences (``cluster``, ``rank`` columns) a policy selects: rank below the
    budget of its cluster (``counts`` indexed like the sorted cluster ``ids``)."""
    cluster = sequences.column("cluster").to_numpy()
    position = np.searchsorted(ids, cluster)
    if len(cluster) and (np.any(position >= len(ids)) or np.any(ids[np.minimum(position, len(ids) - 1)] != cluster)):
        raise ValueError("a sequence row belongs to a cluster without a budget")
    return sequences.filter(pa.array(sequences.column("rank").to_numpy() < counts[position]))


@dataclass(frozen=True)
class RangeChecks:
    """What the selection of clusters [start, stop) is checked for: exact budgets (T12) and quality signal (T16)."""

    budgets_exact: bool  # every cluster holds exactly its budget and no doc_id is selected twice
    budget: int
    clusters_off_budget: int
    duplicate_ids: int
    quality_signal: bool  # mean u of the selected documents below the candidates' (true when none is selected)
    mean_u_selected: float
    mean_u_candidates: float
    u_std_pool: float
    u_std_within_clusters: float


def check_range(candidates: Candidates, result: ClusterSelection, budgets: np.ndarray, start: int,
                stop: int) -> RangeChecks:
    """Selected documents per cluster against ``budgets`` (indexed by cluster id), duplicates, and how u moved."""
    per_cluster = np.bincount(result.cluster - start, minlength=stop - start) if stop > start else np.zeros(0)
    expected = budgets[start:stop]
    duplicates = len(result) - len(set(candidates.doc_id[result.rows].tolist()))
    u = candidates.u
    pool_u, picked_u = float(np.mean(u)) if len(u) else 0.0, float(np.mean(u[result.rows])) if len(result) else 0.0
    # How much u varies inside clusters against across the pool: when it barely does (h-clusters also group
    # similar u, and a weak model spreads u little), the greedy is driven by diversity and T16 can fail.
    within_std = float(np.mean([u[candidates.cluster == c].std() for c in np.unique(candidates.cluster)])) \
        if len(u) else 0.0
    return RangeChecks(
        budgets_exact=bool(np.array_equal(per_cluster, expected)) and duplicates == 0, budget=int(expected.sum()),
        clusters_off_budget=int((per_cluster != expected).sum()), duplicate_ids=duplicates,
        quality_signal=bool(len(result) == 0 or picked_u < pool_u), mean_u_selected=picked_u,
        mean_u_candidates=pool_u, u_std_pool=float(np.std(u)) if len(u) else 0.0, u_std_within_clusters=within_std)


# --------------------------------------------------------------------------------- methods and baselines


def _random_keys(scores: np.ndarray, doc_ids: pa.Array, seed: int, temperature: float) -> np.ndarray:
    return doc_uniforms(doc_ids, seed)


def _lowest_keys(scores: np.ndarray, doc_ids: pa.Array, seed: int, temperature: float) -> np.ndarray:
    return gumbel_keys(scores, doc_ids, temperature, seed, lowest=True)


def _highest_keys(scores: np.ndarray, doc_ids: pa.Array, seed: int, temperature: float) -> np.ndarray:
    return -np.asarray(scores, dtype=np.float64)


@dataclass(frozen=True)
class SelectionMethod:
    """A selection method the report compares: its name (the partition key of every per-method asset), the asset
    that selects with it, and for a baseline the per-document score it reads and the sort key it picks by at
    Group-MATES' budget. Group-MATES itself selects per cluster range (``select_in_clusters``) and has no
    ``sort_key``."""

    name: str
    asset: str
    description: str
    score_asset: str | None = None  # where the score column is: "pool_predictions" or "filtered_pool_shard"
    score_column: str | None = None
    ranked: bool = True  # False: not ranked by the score, which is only reported (seeded uniform sample)
    # (scores, their doc_ids, seed, temperature) -> one float64 key per document, computed from the document
    # alone (never from its position), so a stream over the shards can select: the budget smallest keys, ties by
    # doc_id, in that order
    sort_key: Callable[[np.ndarray, pa.Array, int, float], np.ndarray] | None = None
    temperature_setting: str | None = None  # the selection profile field with its Gumbel-top-k temperature
    policy: str | None = None  # Group-MATES: its cluster budget policy (lib.budgets.POLICIES); None for a baseline

    @property
    def is_baseline(self) -> bool:
        return self.sort_key is not None

    def draws_noise(self, temperature: float) -> bool:
        """Whether its selection depends on seeded random draws (:func:`doc_uniforms`)."""
        return self.is_baseline and (not self.ranked or temperature > 0)


SELECTION_METHODS: dict[str, SelectionMethod] = {}


def register_method(method: SelectionMethod) -> SelectionMethod:
    """Add a method; the order of registration is the order of the partition keys and the report."""
    if method.name in SELECTION_METHODS:
        raise ValueError(f"selection method {method.name!r} is registered twice")
    SELECTION_METHODS[method.name] = method
    return method


def baseline_methods() -> list[SelectionMethod]:
    return [method for method in SELECTION_METHODS.values() if method.is_baseline]


def policy_methods() -> list[SelectionMethod]:
    """The Group-MATES methods whose cluster budgets are not the paper's uniform ratio (lib.budgets)."""
    return [method for method in SELECTION_METHODS.values() if method.policy not in (None, budgets.UNIFORM)]


register_method(SelectionMethod(
    "group_mates", "selected_documents", "Group-MATES: greedy selection inside every influence-aware cluster by "
    "the predicted marginal influence given what the cluster already selected.", policy=budgets.UNIFORM))
register_method(SelectionMethod(
    "group_mates_weighted", "selected_weighted", "Group-MATES with influence-weighted budgets: the same greedy "
    "inside each cluster, but each cluster's share of the same total follows its predicted benefit (the mean "
    "predicted influence of its first picks), between a floor and a cap per cluster.", policy=budgets.WEIGHTED))
register_method(SelectionMethod(
    "group_mates_global", "selected_global", "Group-MATES with a global budget: the greedy over the whole pool, "
    "always taking the most beneficial next pick of any cluster (the relational term restricted to the pick's own "
    "cluster), after each cluster's floor and up to its cap.", policy=budgets.GLOBAL))
register_method(SelectionMethod(
    "random", "selected_random", "Baseline: a seeded uniform sample of the filtered pool, the same number of "
    "documents as Group-MATES selects.",
    score_asset="pool_predictions", score_column="u_individual", ranked=False, sort_key=_random_keys))
register_method(SelectionMethod(
    "mates", "selected_mates", "Baseline (MATES): the documents with the most beneficial individual influence "
    "(lowest u of the individual model), Group-MATES' budget; with selection.mates_temperature > 0, MATES' "
    "Gumbel-top-k sampling at that temperature instead of the deterministic top-k.",
    score_asset="pool_predictions", score_column="u_individual", sort_key=_lowest_keys,
    temperature_setting="mates_temperature"))
register_method(SelectionMethod(
    "fasttext", "selected_fasttext", "Baseline: the documents with the highest fastText quality score, "
    "Group-MATES' budget.",
    score_asset="filtered_pool_shard", score_column="quality_score", sort_key=_highest_keys))


@dataclass(frozen=True)
class ScoredPool:
    """Every document of the filtered pool with a baseline's score, shard by shard."""

    doc_ids: list[str]
    shards: list[str]
    scores: np.ndarray


def scored_pool(tables: dict[str, pa.Table], score_column: str) -> ScoredPool:
    """One pool from every shard's table (doc_id and ``score_column``), in the order of ``tables``."""
    keys = list(tables)
    return ScoredPool(
        doc_ids=[d for k in keys for d in tables[k].column("doc_id").to_pylist()],
        shards=[k for k in keys for _ in range(tables[k].num_rows)],
        scores=np.concatenate([tables[k].column(score_column).to_numpy() for k in keys]) if keys else np.zeros(0))


def _clean_keys(keys: np.ndarray) -> np.ndarray:
    """NaN keys last (as +inf), and -0.0 as 0.0, so numpy's and Arrow's sorts agree on every tie."""
    keys = np.asarray(keys, dtype=np.float64)
    return np.where(np.isnan(keys), np.inf, keys) + 0.0


def _check_baseline(method: SelectionMethod, temperature: float) -> None:
    if method.sort_key is None:
        raise ValueError(f"{method.name} is not a baseline")
    if temperature and not method.temperature_setting:
        raise ValueError(f"{method.name} has no sampling temperature, got {temperature}")


def select_baseline(method: SelectionMethod, pool: ScoredPool, budget: int, seed: int,
                    temperature: float = 0.0) -> np.ndarray:
    """Rows of ``pool`` a baseline picks, in selection order: the ``budget`` smallest sort keys, ties by doc_id
    (never by input order). The whole pool at once: the reference that :func:`stream_baseline`, which the
    assets run, must equal. ``temperature`` > 0 samples by Gumbel-top-k where the method supports it (MATES)."""
    _check_baseline(method, temperature)
    order = np.argsort(np.array(pool.doc_ids, dtype=object), kind="stable")
    keys = _clean_keys(method.sort_key(pool.scores[order], pa.array([pool.doc_ids[i] for i in order], pa.string()),
                                       seed, temperature))
    return order[top_k(keys, budget, lowest=True)]


def baseline_table(method: SelectionMethod, pool: ScoredPool, rows: np.ndarray) -> pa.Table:
    """A baseline's selection: doc_id, shard, rank, score (0 for an unranked method)."""
    return pa.table({"doc_id": pa.array([pool.doc_ids[i] for i in rows], pa.string()),
                     "shard": pa.array([pool.shards[i] for i in rows], pa.string()),
                     "rank": pa.array(np.arange(len(rows)), pa.int64()),
                     "score": pa.array(pool.scores[rows] if method.ranked else np.zeros(len(rows)), pa.float32())})


@dataclass(frozen=True)
class StreamedBaseline:
    """A baseline's selection made shard by shard: its table (as :func:`baseline_table`) and the pool's figures."""

    table: pa.Table
    pool: int  # documents read
    mean_score_pool: float | None
    mean_score_selected: float | None


def stream_baseline(method: SelectionMethod, shards: Callable[[], Iterable[tuple[str, pa.Table]]], budget: int,
                    seed: int, temperature: float = 0.0) -> StreamedBaseline:
    """:func:`select_baseline` over shards read one at a time: ``shards()`` yields (shard key, table with doc_id
    and the method's score column) and is called twice. Pass one finds the ``budget``-th smallest sort key,
    holding at most twice the budget's keys; pass two keeps the documents at or below it, and a sort by key and
    doc_id cuts them at the budget. Memory: the selection, never the pool; the same rows in the same order as
    the whole pool at once (``test_selection.py::test_streamed_baselines_equal_the_whole_pool``)."""
    _check_baseline(method, temperature)
    threshold, pool, score_sum = _kth_smallest_key(method, shards, budget, seed, temperature)
    if budget > pool:
        raise ValueError(f"{method.name}: a budget of {budget:,} documents from a pool of {pool:,}")
    parts = []
    for key, table, scores, keys in _keyed(method, shards, seed, temperature) if budget else ():
        mask = keys <= threshold
        parts.append(pa.table({"key": pa.array(keys[mask], pa.float64()), "doc_id": table.column("doc_id").filter(
            pa.array(mask)).cast(pa.string()), "shard": pa.array([key] * int(mask.sum()), pa.string()),
            "value": pa.array(scores[mask], pa.float64())}))
    schema = pa.schema({"key": pa.float64(), "doc_id": pa.string(), "shard": pa.string(), "value": pa.float64()})
    found = pa.concat_tables(parts) if parts else schema.empty_table()
    chosen = found.take(pc.sort_indices(found, sort_keys=[("key", "ascending"), ("doc_id", "ascending")])[:budget])
    values = chosen.column("value").to_numpy()
    table = pa.table({"doc_id": chosen.column("doc_id"), "shard": chosen.column("shard"),
                      "rank": pa.array(np.arange(chosen.num_rows), pa.int64()),
                      "score": pa.array(values if method.ranked else np.zeros(len(values)), pa.float32())})
    return StreamedBaseline(table, pool, score_sum / pool if pool else None,
                            float(values.mean()) if len(values) else None)


def _keyed(method: SelectionMethod, shards: Callable[[], Iterable[tuple[str, pa.Table]]], seed: int,
           temperature: float) -> Iterator[tuple[str, pa.Table, np.ndarray, np.ndarray]]:
    for key, table in shards():
        scores = table.column(method.score_column).to_numpy().astype(np.float64)
        yield key, table, scores, _clean_keys(method.sort_key(scores, table.column("doc_id"), seed, temperature))


def _kth_smallest_key(method: SelectionMethod, shards: Callable[[], Iterable[tuple[str, pa.Table]]], budget: int,
                      seed: int, temperature: float) -> tuple[float, int, float]:
    """(the ``budget``-th smallest key, documents, sum of scores) in one pass; memory: at most 2 x budget keys."""
    kept, held, threshold, pool, score_sum = [], 0, np.inf, 0, 0.0
    for _, _, scores, keys in _keyed(method, shards, seed, temperature):
        pool, score_sum = pool + len(keys), score_sum + float(scores.sum())
        if budget == 0:
            continue
        small = keys[keys <= threshold]
        kept.append(small)
        held += len(small)
        if held >= 2 * budget:  # keep the budget smallest: anything larger can never be selected
            smallest = np.partition(np.concatenate(kept), budget - 1)[:budget]
            kept, held, threshold = [smallest], budget, float(smallest.max())
    if budget == 0 or held < budget:
        return -np.inf, pool, score_sum
    return float(np.partition(np.concatenate(kept), budget - 1)[budget - 1]), pool, score_sum
