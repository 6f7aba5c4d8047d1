"""Oracle data influences: training trajectories from the probe checkpoint and their reference-loss labels.

A trajectory is T distinct probe-pool contexts applied one after another, one AdamW step each. Model AND
optimizer are restored to the probe checkpoint at the start of every trajectory, never between its steps,
so the t-th label measures x_t given the prefix (Group-MATES), not x_t alone (MATES). After each step the
reference loss L_r is measured; the stored labels are

    cumulative c_t = L_r(M_{t+1}) - L_r(M_1)        marginal I_t = c_t - c_{t-1}  (I_1 = c_1)

so sum_t I_t = L_r(M_{T+1}) - L_r(M_1) (invariant T8) holds by construction; ``replay_final_losses`` measures it
instead, replaying stored trajectories from the checkpoint on disk. The probe step uses the learning rate, betas
and moments stored in the checkpoint's optimizer state, as the research code does.

Work is split into blocks of trajectories (one Dagster partition each). Inside a block, results are written
in parts of a fixed number of trajectories; a killed block resumes at the first missing part and, because
the plan is a pure function of (seed, block), recomputes exactly the trajectories it lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from groupmates_assets.lib import failpoints, layout, lm
from groupmates_assets.lib.storage import Storage

ORACLE_SCHEMA = pa.schema([
    ("trajectory_id", pa.int64()),
    ("block", pa.int32()),
    ("policy", pa.string()),
    ("context_index", pa.list_(pa.int64())),  # rows of the probe pool
    ("context_id", pa.list_(pa.string())),  # stable ids: "<shard key>:<context number>"
    ("cumulative", pa.list_(pa.float32())),  # c_t = L_r(M_{t+1}) - L_r(M_1)
    ("marginal", pa.list_(pa.float32())),  # I_t = c_t - c_{t-1}
    ("base_loss", pa.float64()),  # L_r(M_1)
    ("final_loss", pa.float64()),  # L_r(M_{T+1})
])


def random_plan(pool_size: int, trajectories: int, length: int, seed: int, block: int) -> np.ndarray:
    """[trajectories, length] pool rows: each row `length` distinct rows drawn uniformly (pi_rand).

    The generator is seeded by (seed, block) alone, so a block's plan never depends on which other blocks
    ran, and a rerun draws exactly the same trajectories.
    """
    if length > pool_size:
        raise ValueError(f"trajectory length {length} exceeds the probe pool ({pool_size} contexts)")
    rng = np.random.default_rng([seed, block])
    return np.stack([rng.choice(pool_size, size=length, replace=False) for _ in range(trajectories)]).astype(np.int64)


@dataclass(frozen=True)
class TrajectoryResult:
    trajectory_id: int
    context_index: list[int]
    cumulative: list[float]
    base_loss: float

    @property
    def marginal(self) -> list[float]:
        return marginal_from_cumulative(self.cumulative)

    @property
    def final_loss(self) -> float:
        return self.base_loss + self.cumulative[-1]


def marginal_from_cumulative(cumulative: Sequence[float]) -> list[float]:
    """I_1 = c_1, I_t = c_t - c_{t-1}: the marginal effect of each step given its prefix."""
    out, previous = [], 0.0
    for value in cumulative:
        out.append(float(value) - previous)
        previous = float(value)
    return out


class OracleCollector:
    """Runs trajectories from one probe checkpoint, restoring model and optimizer before each."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: lm.ReferenceBatch,
                 pool: np.ndarray, optim_config: lm.OptimConfig, max_reference_tokens: int = 16384):
        self.model, self.optimizer, self.reference = model, optimizer, reference
        self.pool = pool
        self.optim_config = optim_config
        self.max_reference_tokens = max_reference_tokens
        self.device = next(model.parameters()).device
        self.checkpoint = lm.snapshot(model, optimizer)
        self.base_loss = self._reference_loss()

    def _reference_loss(self) -> float:
        return lm.reference_loss(self.model, self.reference, max_tokens_per_forward=self.max_reference_tokens)

    def _context(self, row: int) -> torch.Tensor:
        return torch.from_numpy(self.pool[row].astype(np.int64)).unsqueeze(0).to(self.device)

    def run(self, trajectory_id: int, rows: Sequence[int]) -> TrajectoryResult:
        lm.restore(self.model, self.optimizer, self.checkpoint)
        cumulative = []
        for row in rows:
            lm.train_step(self.model, self.optimizer, self._context(int(row)), self.optim_config)
            cumulative.append(self._reference_loss() - self.base_loss)
            failpoints.hit("oracle.probe")
        return TrajectoryResult(trajectory_id, [int(r) for r in rows], cumulative, self.base_loss)

    def final_change(self, rows: Sequence[int]) -> float:
        """L_r(M_{T+1}) - L_r(M_1) of one trajectory, the reference loss measured once at its end: the same steps
        as :meth:`run` (so the same value as its last cumulative label) at about half the cost."""
        lm.restore(self.model, self.optimizer, self.checkpoint)
        for row in rows:
            lm.train_step(self.model, self.optimizer, self._context(int(row)), self.optim_config)
            failpoints.hit("oracle.probe")
        return self._reference_loss() - self.base_loss

    def run_many(self, ids: Sequence[int], plan: np.ndarray,
                 progress: Callable[[int, float], None] | None = None) -> Iterator[TrajectoryResult]:
        started = time.perf_counter()
        for done, (trajectory_id, rows) in enumerate(zip(ids, plan, strict=True), 1):
            yield self.run(int(trajectory_id), rows)
            if progress:
                progress(done, time.perf_counter() - started)


def results_table(results: Sequence[TrajectoryResult], block: int, policy: str | Sequence[str],
                  context_ids: Sequence[str]) -> pa.Table:
    """Oracle rows as Arrow, with stable context ids next to the pool rows (``policy``: one, or one per row)."""
    policies = [policy] * len(results) if isinstance(policy, str) else [str(p) for p in policy]
    return pa.table({
        "trajectory_id": [r.trajectory_id for r in results],
        "block": [block] * len(results),
        "policy": policies,
        "context_index": [r.context_index for r in results],
        "context_id": [[context_ids[i] for i in r.context_index] for r in results],
        "cumulative": [r.cumulative for r in results],
        "marginal": [r.marginal for r in results],
        "base_loss": [r.base_loss for r in results],
        "final_loss": [r.final_loss for r in results],
    }, schema=ORACLE_SCHEMA)


def check_labels(table: pa.Table, length: int, expected_rows: int, tolerance: float = 1e-4) -> tuple[bool, dict]:
    """Block-level invariants: row count, T distinct contexts per row, finite labels, telescoping sums (T8)."""
    rows = table.to_pydict()
    problems = []
    for i, (contexts, cumulative, marginal) in enumerate(zip(rows["context_index"], rows["cumulative"],
                                                             rows["marginal"], strict=True)):
        if len(contexts) != length or len(set(contexts)) != length:
            problems.append(f"trajectory {rows['trajectory_id'][i]}: contexts not {length} distinct")
        if not np.all(np.isfinite(cumulative)) or not np.all(np.isfinite(marginal)):
            problems.append(f"trajectory {rows['trajectory_id'][i]}: non-finite labels")
        elif abs(sum(marginal) - (rows["final_loss"][i] - rows["base_loss"][i])) > tolerance:
            problems.append(f"trajectory {rows['trajectory_id'][i]}: marginal labels do not telescope")
    duplicates = len(rows["trajectory_id"]) - len(set(rows["trajectory_id"]))
    passed = not problems and duplicates == 0 and table.num_rows == expected_rows
    return passed, {"rows": table.num_rows, "expected_rows": expected_rows, "duplicate_ids": duplicates,
                    "problems": "; ".join(problems[:5]) or "none"}


def replay_rows(n_rows: int, sample: int, seed: int, block: int) -> np.ndarray:
    """Rows of a block to replay for the direct T8 check: ``sample`` of them, seeded by (seed, block) alone."""
    rng = np.random.default_rng([seed, block, 8])  # a stream of its own, apart from the plan's (seed, block)
    return np.sort(rng.choice(n_rows, size=min(max(sample, 0), n_rows), replace=False)).astype(np.int64)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def replay_final_losses(table: pa.Table, rows: Sequence[int], checkpoint_dir: str, pool: np.ndarray,
                        reference: lm.ReferenceBatch, tolerance: float, device: str | None = None,
                        torch_threads: int | None = None) -> tuple[bool, dict]:
    """T8 measured, not derived: replay stored trajectories from the probe checkpoint and compare.

    For each of ``rows`` the checkpoint is loaded afresh from disk (not the collector's in-memory snapshot), the
    trajectory's contexts are applied one AdamW step each, and L_r(M_1) and L_r(M_{T+1}) are measured on the
    reference set. The check fails when the stored ``final_loss`` or ``base_loss`` differs from the measured one,
    or the stored marginals do not sum to the measured change, by more than ``tolerance`` (nats). The stored
    labels are only consistent with each other by construction; this is what ties them to the checkpoint.
    ``device`` and ``torch_threads`` should be the block's own, so the replay takes the same kernels.
    """
    stored = table.to_pydict()
    replayed, problems, worst = [], [], 0.0
    with _torch_threads(torch_threads):
        for row in (int(r) for r in rows):
            model, optimizer, state = lm.load_checkpoint(checkpoint_dir, device)
            base = lm.reference_loss(model, reference)
            for context in stored["context_index"][row]:
                tokens = torch.from_numpy(np.asarray(pool[int(context)], dtype=np.int64)).unsqueeze(0)
                lm.train_step(model, optimizer, tokens.to(next(model.parameters()).device), state["optim_config"])
            final = lm.reference_loss(model, reference)
            trajectory = stored["trajectory_id"][row]
            gaps = {"final_loss": abs(final - stored["final_loss"][row]),
                    "base_loss": abs(base - stored["base_loss"][row]),
                    "sum of marginals": abs(sum(stored["marginal"][row]) - (final - base))}
            worst = max(worst, *gaps.values())
            problems += [f"trajectory {trajectory}: stored {name} off the replay by {gap:.3g}"
                         for name, gap in gaps.items() if not gap <= tolerance]
            replayed.append({"trajectory_id": trajectory, "recomputed_final_loss": round(final, 7),
                             "stored_final_loss": round(stored["final_loss"][row], 7),
                             "recomputed_base_loss": round(base, 7)})
    return not problems, {"replayed": replayed, "replay_max_abs_difference": worst, "replay_tolerance": tolerance,
                          "replay_problems": "; ".join(problems[:5]) or "none"}


# -- running a block, in this process or in several replica processes ----------------------------------------
@dataclass(frozen=True)
class BlockJob:
    """Everything needed to run (parts of) one block of trajectories; picklable for worker processes."""

    storage_root: str
    out_dir: str  # relative to the storage root
    checkpoint_dir: str  # a local directory holding the probe checkpoint
    pool_path: str  # a local .npy of probe-pool contexts
    reference_examples: list[tuple[list[int], list[int]]]
    context_ids: list[str]
    plan: np.ndarray  # [trajectories, T] probe-pool rows
    trajectory_ids: np.ndarray
    block: int
    part_size: int
    torch_threads: int = 2
    device: str | None = None  # None: CUDA when present
    policy: str | tuple[str, ...] = "random"  # one for the block, or one per trajectory of the plan

    @property
    def parts(self) -> int:
        return -(-len(self.plan) // self.part_size)

    def part_path(self, number: int) -> str:
        return f"{self.out_dir}/part-{number:05d}.parquet"

    def part_rows(self, number: int) -> slice:
        return slice(number * self.part_size, min((number + 1) * self.part_size, len(self.plan)))


_WORKER: dict[str, object] = {}


def replica_device(device: str | None, replica: int, gpus: int) -> str | None:
    """Where replica ``replica`` (0-based) runs: ``device`` when one is set or the machine has at most one GPU
    (None: ``lm.default_device()``), else GPU ``replica mod gpus``, so replicas spread over every card instead
    of all landing on cuda:0."""
    if device is None and gpus > 1:
        return f"cuda:{replica % gpus}"
    return device


def _init_worker(job: BlockJob, counter=None) -> None:
    """Load the checkpoint once per process; every trajectory then restores from the in-memory snapshot.
    ``counter`` (a shared ``multiprocessing.Value``) numbers the replica processes of a pool."""
    torch.set_num_threads(job.torch_threads)
    device = job.device
    if counter is not None:
        with counter.get_lock():
            replica, counter.value = counter.value, counter.value + 1
        device = replica_device(device, replica, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is not None:
            torch.cuda.set_device(device)  # no stray context (and kernels) on cuda:0 for a replica elsewhere
    model, optimizer, state = lm.load_checkpoint(job.checkpoint_dir, device)
    pool = np.load(job.pool_path, mmap_mode="r", allow_pickle=False)
    _WORKER["job"] = job
    _WORKER["collector"] = OracleCollector(model, optimizer, lm.ReferenceBatch(job.reference_examples), pool,
                                           state["optim_config"])


def _run_part(number: int) -> tuple[int, int, float]:
    from groupmates_assets.lib.storage import Storage

    job: BlockJob = _WORKER["job"]  # type: ignore[assignment]
    collector: OracleCollector = _WORKER["collector"]  # type: ignore[assignment]
    rows = job.part_rows(number)
    results = list(collector.run_many(job.trajectory_ids[rows], job.plan[rows]))
    policy = job.policy if isinstance(job.policy, str) else job.policy[rows]
    Storage(job.storage_root).write_parquet(job.part_path(number),
                                            results_table(results, job.block, policy, job.context_ids))
    return number, len(results), collector.base_loss


def run_block(job: BlockJob, parts: Sequence[int], workers: int = 1,
              progress: Callable[[int, int], None] | None = None) -> float | None:
    """Run the given parts of a block; returns the base reference loss (None when there was nothing to run).

    With ``workers > 1`` the parts are spread over that many replica processes, each with its own model and
    optimizer copy (on one GPU this overlaps many small single-sequence steps; with several GPUs and no
    ``job.device`` the replicas go round-robin over them; on a CPU it trades threads for processes). Each part is
    written atomically as soon as it is done, so progress survives a kill.
    """
    if not parts:
        return None
    base_loss, done = None, 0
    total = sum(job.part_rows(p).stop - job.part_rows(p).start for p in parts)
    if workers <= 1:
        _init_worker(job)
        results = map(_run_part, parts)
        pool = None
    else:
        import multiprocessing

        # spawn, never fork: a forked child cannot use CUDA once the parent has initialised it.
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(min(workers, len(parts)), initializer=_init_worker, initargs=(job, ctx.Value("i", 0)))
        results = pool.imap_unordered(_run_part, parts)
    try:
        for _number, count, loss in results:
            base_loss, done = loss, done + count
            if progress:
                progress(done, total)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _WORKER.clear()
    return base_loss


def read_oracle_blocks(storage: Storage, root_dir: str, block_keys: list[str],
                       asset_name: str) -> tuple[list[pa.Table], str]:
    """Every block of the current oracle labels under ``root_dir`` (tables, fingerprint); a missing block is an
    error that names it, never a silently smaller training set."""
    fingerprint = layout.current_oracle(storage, root_dir, asset_name)["fingerprint"]
    tables, missing = [], []
    for key in block_keys:
        marker = f"{root_dir}/{fingerprint}/{key}/_SUCCESS.json"
        if not storage.exists(marker):
            missing.append(key)
            continue
        tables += [storage.read_parquet(p) for p in storage.read_json(marker)["parts"]]
    if missing:
        raise layout.MissingArtifactError(
            f"{asset_name} blocks {', '.join(missing)} are not materialized for the current inputs (fingerprint "
            f"{fingerprint}); materialize them before training on the labels")
    return tables, fingerprint
