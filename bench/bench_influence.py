"""Influence model throughput on 2 CPU cores with the demo profile's encoder settings.

Figures: training trajectories/s (forward + backward + AdamW, T = 10 documents per trajectory), embedding
documents/s in the padding-free layout against the reference's padded layout, and one bootstrap beam search
over a demo-sized probe pool. Text: the Python documentation topics shipped with the interpreter
(``pydoc_data.topics``), cut into ~1,000-character documents like the demo's 256-token contexts.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from bench.run import Figure
from groupmates_assets.lib.influence import bootstrap as boot
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.influence import training as tr
from groupmates_assets.settings import METHOD, get_profile

DOCUMENTS = 256
TRAJECTORIES = 8


def _texts(count: int, width: int = 1000) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return [text[i * width:(i + 1) * width] for i in range(count)]


def run(repeats: int = 3) -> list[Figure]:
    profile = get_profile("demo").influence
    torch.set_num_threads(profile.torch_threads)
    source = enc.resolve_encoder(profile.encoder)
    docs = enc.chunk_documents(enc.load_encoder_tokenizer(source), _texts(DOCUMENTS), profile.chunk_len,
                               profile.chunks)
    torch.manual_seed(0)
    model = im.build_model(source, im.InfluenceModelConfig(chunk_len=profile.chunk_len, chunks=profile.chunks,
                                                           encoder_layers=profile.encoder_layers))
    rng = np.random.default_rng(0)
    contexts = np.stack([rng.choice(DOCUMENTS, METHOD.trajectory_length, replace=False)
                         for _ in range(TRAJECTORIES)])
    data = tr.Trajectories(contexts, rng.normal(size=contexts.shape), np.array(["random"] * TRAJECTORIES,
                                                                                dtype=object),
                           np.arange(TRAJECTORIES))
    settings = tr.TrainSettings(epochs=1, trajectories_per_step=profile.trajectories_per_step, warmup_steps=1,
                                evals_per_epoch=0, max_tokens=profile.max_tokens)
    train_rows = np.arange(TRAJECTORIES)
    best_train = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        tr.train_model(model, docs, data, train_rows, np.zeros(0, dtype=np.int64), settings)
        best_train = min(best_train, time.perf_counter() - started)
    model.eval()
    layouts = {}
    for layout in ("trimmed", "padded"):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.no_grad():
                model.embed(docs, np.arange(DOCUMENTS), max_tokens=profile.max_tokens, layout=layout)
            best = min(best, time.perf_counter() - started)
        layouts[layout] = DOCUMENTS / best
    pool = get_profile("demo").oracle.probe_pool_size
    h = torch.nn.functional.normalize(torch.randn(pool, model.hidden_size), dim=-1)
    u = torch.randn(pool)
    started = time.perf_counter()
    for order in (1, -1):
        boot.beam_search(h, u, 1.0, 1.0, METHOD.trajectory_length, profile.bootstrap_width,
                         profile.bootstrap_per_tail, order)
    beam_seconds = time.perf_counter() - started
    tokens = docs.token_counts.sum() / DOCUMENTS
    print(f"[bench] influence: {TRAJECTORIES / best_train:.2f} trajectories/s", file=sys.stderr)
    setting = (f"{source.name}, {model.encoder.config.num_hidden_layers} layers, {profile.chunks} x "
               f"{profile.chunk_len}-token chunks ({tokens:.0f} tokens/document), torch {profile.torch_threads} "
               "threads")
    return [
        Figure("influence: training (demo)", round(TRAJECTORIES / best_train, 3), "trajectories/s",
               f"{setting}; {profile.trajectories_per_step} trajectories x {METHOD.trajectory_length} documents "
               "per AdamW step"),
        Figure("influence: embedding, padding-free", round(layouts["trimmed"], 1), "documents/s",
               "only chunks with text, length-sorted, padded per batch"),
        Figure("influence: embedding, padded layout", round(layouts["padded"], 1), "documents/s",
               f"every chunk padded to {profile.chunk_len} tokens, all-padding chunks computed (reference); "
               f"padding-free is {layouts['trimmed'] / layouts['padded']:.2f}x"),
        Figure("influence: bootstrap beam search (demo)", round(beam_seconds, 2), "s",
               f"both tails, {pool} contexts x {model.hidden_size}-d, width {profile.bootstrap_width}, "
               f"{profile.bootstrap_per_tail} beams kept, T = {METHOD.trajectory_length}"),
    ]
