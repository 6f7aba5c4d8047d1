"""A causal check of the selection: the actual reference-loss change of groups drawn from each selected corpus.

Group-MATES selects groups whose joint influence on the reference loss is most negative. This module measures
that quantity directly, at the probe checkpoint and with the oracle collector: group g of every set is T packed
training contexts (the unit the oracle steps on), drawn with a generator seeded by (seed, g), from the set's own
contexts: a method's tokenized corpus, or, for the ``pool`` baseline, the whole tokenized filtered pool (random
groups). Each group runs as one oracle trajectory (model and optimizer restored, one AdamW step per context) and
its actual influence is ``L_r(M_{T+1}) - L_r(M_1)``: NEGATIVE = the group lowers the reference loss (beneficial).

Per method the summary gives the mean actual influence and its difference from the pool groups of the same
index (paired by seed), with a paired bootstrap 95% interval over groups, and the Spearman correlation between
the influence model's predicted group influence (sum over t of pred_t, in loss units) and the actual one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from groupmates_assets.lib import lm, stats
from groupmates_assets.lib import oracle as oracle_lib
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import training as tr
from groupmates_assets.lib.influence.model import InfluenceModel

POOL = "pool"  # the random-group baseline: the whole tokenized filtered pool
SIGN_NOTE = "negative change of the reference loss = beneficial"


@dataclass(frozen=True)
class GroupSet:
    """Contexts a set's groups are drawn from: ``size`` rows, ``gather(rows)`` -> [len(rows), context_len] tokens,
    ``context_id(row)`` a stable id (lineage of every group in the output)."""

    name: str
    size: int
    gather: Callable[[np.ndarray], np.ndarray]
    context_id: Callable[[int], str]

    @classmethod
    def from_rows(cls, name: str, tokens: np.ndarray, rows: np.ndarray, id_prefix: str) -> GroupSet:
        """The set of ``tokens[rows]`` (e.g. a corpus without its padded tail context), ids ``<prefix>:<row>``."""
        rows = np.asarray(rows, dtype=np.int64)
        return cls(name, len(rows), lambda picked: np.asarray(tokens[rows[picked]]),
                   lambda i: f"{id_prefix}:{int(rows[i])}")


def group_rows(set_size: int, groups: int, length: int, seed: int) -> np.ndarray:
    """[groups, length] distinct rows of a set of ``set_size`` contexts; group g uses a generator seeded by
    (seed, g) alone, so every set's group g is drawn under the same seed and with the same size, and a rerun (or a
    larger N) draws the same first groups."""
    if length > set_size:
        raise ValueError(f"a group of {length} contexts needs at least {length} contexts, the set holds {set_size}")
    return np.stack([np.random.default_rng([seed, g]).choice(set_size, size=length, replace=False)
                     for g in range(groups)]).astype(np.int64).reshape(groups, length)


@dataclass(frozen=True)
class GroupPlan:
    """Every set's groups as rows of one stacked context array (pool first, then the methods in order)."""

    sets: tuple[str, ...]
    set_rows: dict[str, np.ndarray]  # [groups, T] rows of each set's own contexts
    tokens: np.ndarray  # [sets * groups * T, context_len]: the contexts of every group, set by set
    context_ids: list[str]

    @property
    def groups(self) -> int:
        return len(next(iter(self.set_rows.values())))

    @property
    def length(self) -> int:
        return next(iter(self.set_rows.values())).shape[1]

    def trajectories(self, name: str) -> np.ndarray:
        """[groups, T] rows of ``tokens`` holding set ``name``'s groups."""
        start = self.sets.index(name) * self.groups * self.length
        return start + np.arange(self.groups * self.length, dtype=np.int64).reshape(self.groups, self.length)

    def group_context_ids(self, name: str) -> list[list[str]]:
        """The stable ids of the contexts of each of set ``name``'s groups."""
        return [[self.context_ids[int(i)] for i in rows] for rows in self.trajectories(name)]


def plan_groups(sets: Sequence[GroupSet], groups: int, length: int, seed: int) -> GroupPlan:
    """Paired groups: group g of every set is drawn under the generator seeded by (seed, g)."""
    if groups < 1:
        raise ValueError(f"need at least one group per set, got {groups}")
    names = tuple(s.name for s in sets)
    if len(set(names)) != len(names):
        raise ValueError(f"set names repeat: {names}")
    set_rows, tokens, ids = {}, [], []
    for group_set in sets:
        rows = group_rows(group_set.size, groups, length, seed)
        set_rows[group_set.name] = rows
        tokens.append(group_set.gather(rows.ravel()))
        ids += [group_set.context_id(int(r)) for r in rows.ravel()]
    return GroupPlan(names, set_rows, np.concatenate(tokens).astype(np.uint32), ids)


# -- running the groups through the oracle collector -----------------------------------------------------------
@dataclass(frozen=True)
class GroupJob:
    """What a replica process needs to run groups; picklable (paths and plain lists only)."""

    checkpoint_dir: str  # a local directory holding the probe checkpoint
    contexts_path: str  # a local .npy of the plan's stacked contexts
    reference_examples: list[tuple[list[int], list[int]]]
    torch_threads: int = 2
    device: str | None = None  # None: CUDA when present


_WORKER: dict[str, oracle_lib.OracleCollector] = {}


def _init_worker(job: GroupJob, counter=None) -> None:
    """Load the checkpoint once per process (as the oracle's replicas do); groups restore from memory."""
    torch.set_num_threads(job.torch_threads)
    device = job.device
    if counter is not None:
        with counter.get_lock():
            replica, counter.value = counter.value, counter.value + 1
        device = oracle_lib.replica_device(device, replica,
                                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is not None:
            torch.cuda.set_device(device)  # no stray context on cuda:0 for a replica elsewhere
    model, optimizer, state = lm.load_checkpoint(job.checkpoint_dir, device)
    contexts = np.load(job.contexts_path, mmap_mode="r", allow_pickle=False)
    _WORKER["collector"] = oracle_lib.OracleCollector(model, optimizer, lm.ReferenceBatch(job.reference_examples),
                                                      contexts, state["optim_config"])


def _run_group(task: tuple[int, list[int]]) -> tuple[int, float, float]:
    """(trajectory index, final cumulative change, base loss) of one group run as a trajectory."""
    collector = _WORKER["collector"]
    index, rows = task
    return index, collector.final_change(rows), collector.base_loss


def iter_groups(job: GroupJob, trajectories: np.ndarray, workers: int = 1) -> Iterator[tuple[int, float, float]]:
    """(index, actual influence, base reference loss) for each row of ``trajectories`` (rows of the stacked
    contexts) run as one oracle trajectory from the probe checkpoint, as they finish, over ``workers`` replica
    processes each with its own model and optimizer (as ``oracle.run_block``)."""
    tasks = [(i, [int(r) for r in rows]) for i, rows in enumerate(trajectories)]
    if not tasks:
        return
    if workers <= 1:
        _init_worker(job)
        try:
            yield from map(_run_group, tasks)
        finally:
            _WORKER.clear()
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # never fork: a forked child cannot use an initialised CUDA
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(job, ctx.Value("i", 0))) as pool:
        yield from pool.imap_unordered(_run_group, tasks)


def run_sets(job: GroupJob, plan: GroupPlan, names: Sequence[str], workers: int,
             on_set: Callable[[str, list[float], float], None],
             progress: Callable[[int, int], None] | None = None) -> None:
    """Run the groups of the sets ``names`` in one pool of replicas; ``on_set(name, actual, base_loss)`` is called as
    soon as all of a set's groups are done (so a killed run keeps the sets it finished)."""
    trajectories = np.concatenate([plan.trajectories(n) for n in names]) if names else np.zeros((0, plan.length))
    owner = np.repeat(np.arange(len(names)), plan.groups)
    actual = np.full(len(trajectories), np.nan)
    left = {i: plan.groups for i in range(len(names))}
    for done, (index, change, base) in enumerate(iter_groups(job, trajectories, workers), 1):
        actual[index] = change
        left[owner[index]] -= 1
        if left[owner[index]] == 0:
            rows = slice(owner[index] * plan.groups, (owner[index] + 1) * plan.groups)
            on_set(names[owner[index]], actual[rows].tolist(), base)
        if progress:
            progress(done, len(trajectories))


# -- predictions of the influence model ------------------------------------------------------------------------
def predicted_group_influence(predict_z: Callable[[np.ndarray], np.ndarray], trajectories: np.ndarray,
                              label_mean: float, label_std: float) -> np.ndarray:
    """Sum over t of pred_t in loss units: the model predicts z-scored marginal labels, so each pred_t is
    ``z * std + mean`` and the group's prediction is their sum (method spec: the group's influence)."""
    z = np.asarray(predict_z(trajectories), dtype=np.float64)
    if z.shape != trajectories.shape:
        raise ValueError(f"predictions of shape {z.shape} for trajectories of shape {trajectories.shape}")
    return (z * label_std + label_mean).sum(axis=1)


def predicted_by_set(model: InfluenceModel, encoder_tokenizer, texts: Sequence[str], plan: GroupPlan,
                     max_tokens: int = 16384) -> dict[str, list[float]]:
    """Predicted group influence of every set's groups: the group contexts' text (``texts``, one per row of
    ``plan.tokens``) cut into the model's chunks, each group scored as one trajectory."""
    docs = enc.chunk_documents(encoder_tokenizer, texts, model.config.chunk_len, model.config.chunks)
    return {name: predicted_group_influence(
        lambda rows: tr.predict(model, docs, rows, max_tokens=max_tokens), plan.trajectories(name),
        model.config.label_mean, model.config.label_std).tolist() for name in plan.sets}


# -- summary ---------------------------------------------------------------------------------------------------
def summarize(actual: Mapping[str, Sequence[float]], predicted: Mapping[str, Sequence[float]],
              baseline: str = POOL, seed: int = 0, references: Sequence[str] = ()) -> dict:
    """Per set: groups, mean actual influence, the paired difference from the baseline's groups with its
    bootstrap 95% interval, and Spearman(predicted, actual); plus Spearman over every group of every set. For each
    set of ``references`` (e.g. MATES), every other set's paired difference from it too (``minus``)."""
    for role, name in (("baseline", baseline), *(("reference", r) for r in references)):
        if name not in actual:
            raise ValueError(f"no groups for the {role} {name!r}; sets: {', '.join(actual)}")
    base = np.asarray(actual[baseline], dtype=np.float64)
    rows = {}
    for name, values in actual.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != base.shape or not np.isfinite(values).all():
            raise ValueError(f"set {name!r}: {values.size} actual influences (finite: "
                             f"{bool(np.isfinite(values).all())}); the baseline has {base.size}")
        row = {"groups": int(values.size), "mean_actual": float(values.mean()),
               "std_actual": stats.sample_std(values.tolist()),
               "spearman": stats.spearman(predicted[name], values),
               "mean_predicted": float(np.mean(predicted[name]))}
        if name != baseline:
            row["minus_baseline"] = stats.stratified_mean_difference([values - base], seed=seed).as_dict()
        row["minus"] = {ref: stats.stratified_mean_difference(
            [values - np.asarray(actual[ref], dtype=np.float64)], seed=seed).as_dict()
            for ref in references if ref != name}
        rows[name] = row
    everything = [np.concatenate([np.asarray(d[n], dtype=np.float64) for n in actual]) for d in (predicted, actual)]
    return {"baseline": baseline, "references": list(references), "sets": rows,
            "spearman_all": stats.spearman(*everything), "note": SIGN_NOTE}


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _difference(diff: dict | None, missing: str) -> str:
    """The difference with its interval and the verdict the interval supports (negative change = beneficial)."""
    if diff is None:
        return missing
    verdict = ("no detectable difference" if diff["low"] <= 0 <= diff["high"]
               else "more beneficial" if diff["high"] < 0 else "less beneficial")
    return f"{_number(diff['estimate'])} [{_number(diff['low'])}, {_number(diff['high'])}] ({verdict})"


def to_markdown(result: dict) -> str:
    """The causal-check table of the report: method | groups | mean actual change | minus random [95%] | minus each
    reference [95%] | Spearman."""
    summary = result["summary"]
    references = summary.get("references", [])
    lines = ["| method | groups | mean actual change | minus random groups [95% interval] | "
             + "".join(f"minus {ref} [95% interval] | " for ref in references) + "Spearman(pred, actual) |",
             "|---|---:|---:|---|" + "---|" * len(references) + "---:|"]
    for name in result.get("order") or list(summary["sets"]):  # JSON files keep keys sorted; ``order`` is the plan's
        row = summary["sets"][name]
        label = "random groups of the filtered pool" if name == summary["baseline"] else name
        versus = "".join(f"{_difference(row.get('minus', {}).get(ref), '(reference)' if ref == name else 'n/a')} | "
                         for ref in references)
        lines.append(f"| {label} | {row['groups']} | {_number(row['mean_actual'])} | "
                     f"{_difference(row.get('minus_baseline'), '(baseline)')} | {versus}"
                     f"{_number(row['spearman'], 3)} |")
    return "\n".join([
        f"Groups of T = {result['length']} packed training contexts, each run as an oracle trajectory from the probe "
        f"checkpoint (reference loss {result['base_loss']:.4f}); actual change = L_r after the group - L_r before "
        f"({SIGN_NOTE}). Group g of every set is drawn under the same seed; intervals: paired bootstrap over groups "
        "(a difference below 0: more beneficial than what it is compared with).",
        "", *lines, "",
        f"Spearman(predicted, actual) over all {sum(r['groups'] for r in summary['sets'].values())} groups: "
        f"{_number(summary['spearman_all'], 3)}.",
    ])
