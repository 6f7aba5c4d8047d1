"""Oracle probes per hour on 2 CPU cores with the demo profile (a probe = one AdamW step + one reference loss).

Inputs: the demo's probe checkpoint, probe pool and reference set under ``$GROUPMATES_HOME/storage`` when
`make demo` has run; otherwise a freshly initialised demo-shape LM, random contexts and the default reference
set (a probe costs the same either way). Trajectories run through the same ``OracleCollector`` the
``oracle_random`` asset uses, so restores and bookkeeping are included.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from bench.run import Figure
from groupmates_assets.lib import lm
from groupmates_assets.lib import oracle as oracle_lib
from groupmates_assets.lib import reference_set as ref_lib
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import METHOD, get_profile

TRAJECTORIES = 2


def _inputs():
    profile = get_profile("demo")
    storage = Storage(os.path.join(os.environ.get("GROUPMATES_HOME", ".groupmates"), "storage"))
    if all(storage.exists(p) for p in ("lm/probe_checkpoint/trainer_state.json", "oracle/probe_pool/contexts.npy",
                                       "oracle/reference_set.jsonl")):
        model, optimizer, state = lm.load_checkpoint(storage.path("lm/probe_checkpoint"), "cpu")
        pool = np.asarray(storage.read_numpy("oracle/probe_pool/contexts.npy"))
        reference = ref_lib.load_reference_set(storage.path("oracle/reference_set.jsonl"))
        return model, optimizer, state["optim_config"], pool, reference, "demo probe checkpoint from make demo"
    shape = lm.get_shape(profile.lm.shape)
    cfg = lm.OptimConfig(lr=profile.lm.lr, warmup_steps=profile.lm.warmup_steps, total_steps=profile.lm.total_steps)
    model = lm.build_model(shape, seed=0)
    optimizer = lm.make_optimizer(model, cfg)
    lm.set_lr(optimizer, cfg.lr)
    pool = np.random.default_rng(0).integers(0, 50277, size=(64, shape.seq_len + 1)).astype(np.uint32)
    reference = ref_lib.build_reference_set(tk.load_tokenizer(), profile.oracle.reference_source,
                                            profile.oracle.reference_size)
    return model, optimizer, cfg, pool, reference, "fresh demo-shape LM, random contexts"


def run(repeats: int = 3) -> list[Figure]:
    threads = get_profile("demo").lm.torch_threads
    torch.set_num_threads(threads)
    model, optimizer, cfg, pool, reference, origin = _inputs()
    batch = lm.ReferenceBatch(reference.examples)
    collector = oracle_lib.OracleCollector(model, optimizer, batch, pool, cfg)
    plan = oracle_lib.random_plan(len(pool), TRAJECTORIES, METHOD.trajectory_length, seed=0, block=0)
    collector.run(0, plan[0][:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        list(collector.run_many(range(TRAJECTORIES), plan))
        best = min(best, time.perf_counter() - started)
    probes = TRAJECTORIES * METHOD.trajectory_length
    per_probe = best / probes
    step = _best(lambda: lm.train_step(model, optimizer, torch.from_numpy(pool[0].astype(np.int64))[None], cfg),
                 repeats)
    loss = _best(lambda: lm.reference_loss(model, batch), repeats)
    restore = _best(lambda: lm.restore(model, optimizer, collector.checkpoint), repeats)
    print(f"[bench] oracle: {per_probe:.3f} s per probe", file=sys.stderr)
    shape = lm.get_shape(get_profile("demo").lm.shape)
    return [
        Figure("oracle: probes per hour (demo)", round(3600 / per_probe), "probes/h",
               f"{origin}; {lm.param_count(shape):,} parameters; {TRAJECTORIES} trajectories x "
               f"{METHOD.trajectory_length} steps incl. restores; torch {threads} threads; target >= 1,500"),
        Figure("oracle: train step (1 x 257 tokens)", round(step, 3), "s", "AdamW, CE + z-loss, clip 1.0"),
        Figure("oracle: reference loss", round(loss, 3), "s",
               f"{len(batch)} examples, {batch.n_scored_tokens} scored tokens, head on scored rows only"),
        Figure("oracle: restore model + optimizer", round(restore, 3), "s", "once per trajectory"),
        Figure("oracle: demo random-rollout oracle (estimate)",
               round(per_probe * 4 * 5 * METHOD.trajectory_length / 60, 2), "min",
               "4 blocks x 5 trajectories x 10 probes at the measured rate; target < 5 min"),
    ]


def _best(function, repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best
