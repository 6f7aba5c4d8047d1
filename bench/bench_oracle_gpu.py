"""Oracle collector throughput on one accelerator: replica processes vs one trajectory at a time.

Run on a GPU machine with ``python -m bench.run --only oracle_gpu`` (not part of the default set). It saves a
probe checkpoint of the chosen shape (random init plus one AdamW step, so the optimizer has moments), then runs
the same trajectories through ``oracle.run_block`` with 1, 2, 4, ... replica workers on the one device and
reports probes/hour for each. ``workers=1`` is the one-trajectory-at-a-time collector; the research code's
layout spends two GPUs (FSDP, duplicated work) on one trajectory, so its per-GPU rate is at most half of that.

Environment: ``BENCH_SHAPE`` (default 411m on CUDA, tiny elsewhere), ``BENCH_WORKERS`` (default "1,2,4"),
``BENCH_TRAJECTORIES`` per worker (default 8), ``BENCH_REFERENCE`` examples (default 128, 256 tokens each,
the last 32 scored), ``BENCH_STEPS`` per trajectory (default 10).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch

from bench.run import Figure
from groupmates_assets.lib import lm
from groupmates_assets.lib import oracle as oracle_lib


def _settings() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "shape": os.environ.get("BENCH_SHAPE", "411m" if cuda else "tiny"),
        "workers": [int(w) for w in os.environ.get("BENCH_WORKERS", "1,2,4").split(",")],
        "trajectories": int(os.environ.get("BENCH_TRAJECTORIES", "8")),
        "reference": int(os.environ.get("BENCH_REFERENCE", "128")),
        "steps": int(os.environ.get("BENCH_STEPS", "10")),
        "device": "cuda" if cuda else "cpu",
    }


def _checkpoint(directory: str, shape: lm.LMShape, device: str) -> None:
    model = lm.build_model(shape, seed=0, device=device)
    cfg = lm.OptimConfig(total_steps=1000, warmup_steps=10)
    optimizer = lm.make_optimizer(model, cfg)
    tokens = torch.randint(0, shape.vocab_size, (1, shape.seq_len + 1), device=device)
    lm.train_step(model, optimizer, tokens, cfg, lr=1e-3)
    lm.save_checkpoint(directory, model, optimizer, shape, cfg, step=1)
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()


def run(repeats: int = 1) -> list[Figure]:
    del repeats  # each configuration runs once; it is long enough to be stable
    s = _settings()
    shape = lm.get_shape(s["shape"])
    rng = np.random.default_rng(0)
    reference = []
    for _ in range(s["reference"]):
        ids = rng.integers(0, 50000, size=256).tolist()
        reference.append((ids, [-100] * 224 + ids[224:]))
    figures = [Figure("oracle_gpu: setup", s["shape"], "", f"{lm.param_count(shape):,} parameters on {s['device']}"
                      f" ({torch.cuda.get_device_name() if s['device'] == 'cuda' else 'CPU'}); {s['steps']} steps x "
                      f"{shape.seq_len + 1} tokens per trajectory; {s['reference']} reference examples x 256 tokens")]
    rates = {}
    with tempfile.TemporaryDirectory(prefix="groupmates-bench-gpu-") as tmp:
        _checkpoint(os.path.join(tmp, "ckpt"), shape, s["device"])
        pool = rng.integers(0, 50000, size=(max(64, s["steps"] * 4), shape.seq_len + 1)).astype(np.uint32)
        np.save(os.path.join(tmp, "pool.npy"), pool)
        for workers in s["workers"]:
            count = s["trajectories"] * workers
            job = oracle_lib.BlockJob(
                storage_root=os.path.join(tmp, f"out{workers}"), out_dir="block", part_size=1,
                checkpoint_dir=os.path.join(tmp, "ckpt"), pool_path=os.path.join(tmp, "pool.npy"),
                reference_examples=reference, context_ids=[str(i) for i in range(len(pool))],
                plan=oracle_lib.random_plan(len(pool), count, s["steps"], seed=0, block=workers),
                trajectory_ids=np.arange(count), block=workers, device=s["device"],
                torch_threads=max(1, 2 // workers) if s["device"] == "cpu" else 1,
            )
            # Steady state: from the first finished trajectory to the last, so worker start-up (imports, checkpoint
            # load, allocation) is left out; each worker's first trajectory also warms its kernels.
            marks: list[tuple[float, int]] = []
            started = time.perf_counter()
            oracle_lib.run_block(job, list(range(job.parts)), workers,
                                 progress=lambda done, _total, out=marks: out.append((time.perf_counter(), done)))
            seconds = time.perf_counter() - started
            (t_first, n_first), (t_last, n_last) = marks[min(workers, len(marks) - 1) - 1], marks[-1]
            rates[workers] = (n_last - n_first) * s["steps"] / max(t_last - t_first, 1e-9) * 3600
            print(f"[bench] oracle_gpu: {workers} worker(s): {rates[workers]:,.0f} probes/h", file=sys.stderr)
            figures.append(Figure(f"oracle_gpu: {workers} worker(s) per device", round(rates[workers]), "probes/h",
                                  f"steady state over {n_last - n_first} trajectories; {count} in {seconds:.1f} s "
                                  "including start-up"))
    best = max(rates, key=rates.get)
    if 1 in rates:
        figures.append(Figure("oracle_gpu: best vs one at a time", round(rates[best] / rates[1], 2), "x",
                              f"{best} workers; target >= 1.5"))
        figures.append(Figure("oracle_gpu: best vs research layout (per GPU)", round(rates[best] / (rates[1] / 2), 2),
                              "x", "research code: 2 GPUs per trajectory, duplicated work; target >= 3"))
    return figures
