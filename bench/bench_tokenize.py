"""Tokenization throughput on 2 cores: the Rust batch encoder plus DCLM-style packing, on real pool text.

Texts: the filtered pool's kept documents under ``$GROUPMATES_HOME/storage`` when `make demo` has run, else
the embedded pool's raw shards (built into a temporary directory if needed). Context lengths: the demo LM's
257 tokens and DCLM's 2049.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

import fsspec
import pyarrow.parquet as pq

from bench.run import Figure
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib import tokenization as tk

CONTEXT_LENGTHS = (257, 2049)


def _texts(tmp: str) -> tuple[list[str], list[str], str]:
    home = os.environ.get("GROUPMATES_HOME", ".groupmates")
    kept = sorted(glob.glob(os.path.join(home, "storage", "filtered_pool", "*", "kept.parquet")))
    if kept:
        table = pq.read_table(kept, columns=["doc_id", "text"]) if len(kept) == 1 else None
        tables = [pq.read_table(path, columns=["doc_id", "text"]) for path in kept] if table is None else [table]
        ids = [i for t in tables for i in t.column("doc_id").to_pylist()]
        return ids, [x for t in tables for x in t.column("text").to_pylist()], "filtered pool (kept documents)"
    from groupmates_assets.lib.embedded_pool import build_embedded_pool

    shard_dir = os.path.join(home, "storage", "embedded_pool", "shards")
    if not os.path.isdir(shard_dir):
        shard_dir = os.path.join(build_embedded_pool(tmp).shard_paths[0], os.pardir)
    fs = fsspec.filesystem("file")
    shards, _ = shard_io.discover_shards(fs, os.path.abspath(shard_dir))
    ids, texts = [], []
    for shard in shards:
        for batch in shard_io.read_shard(fs, shard):
            ids += [shard_io.make_doc_id(shard.key, line, t) for line, t in zip(batch.lines, batch.texts, strict=True)]
            texts += batch.texts
    return ids, texts, "embedded pool (raw shards)"


def run(repeats: int = 3) -> list[Figure]:
    tokenizer = tk.load_tokenizer()
    eot = tk.eot_token_id(tokenizer)
    with tempfile.TemporaryDirectory(prefix="groupmates-bench-") as tmp:
        ids, texts, origin = _texts(tmp)
    chars = sum(map(len, texts))
    figures = [Figure("tokenize: documents", len(ids), "docs", f"{origin}; {chars:,} characters; "
                      f"{os.cpu_count()} cores, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'default')}")]
    tk.pack_documents(ids[:512], texts[:512], tokenizer, CONTEXT_LENGTHS[0], eot)  # warm-up
    for context_len in CONTEXT_LENGTHS:
        best, packed = float("inf"), None
        for _ in range(repeats):
            started = time.perf_counter()
            packed = tk.pack_documents(ids, texts, tokenizer, context_len, eot)
            best = min(best, time.perf_counter() - started)
        print(f"[bench] tokenize {context_len}: {best:.2f} s", file=sys.stderr)
        figures.append(Figure(f"tokenize: encode + pack to {context_len}", round(packed.total_tokens / best),
                              "tokens/s", f"{packed.total_tokens:,} tokens, {packed.n_contexts:,} contexts; "
                              f"{best:.2f} s; best of {repeats}"))
    return figures
