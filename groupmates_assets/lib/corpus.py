"""A selected corpus: written as DCLM-format JSON lines, read back, packed as LM training data, and the data
passes planned.

The corpus is packed once (DCLM's tokenize-shuffle: documents + EOT, contexts of seq_len + 1 tokens); when it
holds fewer tokens than the training budget, the contexts are repeated in several passes, each pass its own
seeded shuffle (DCLM's multiple data passes), and the training order is cut at the budget.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zstandard

from groupmates_assets.lib import layout
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.jsonsafe import finite
from groupmates_assets.lib.shards import text_hash
from groupmates_assets.lib.storage import Storage


class CorpusShardError(ValueError):
    """A selected-corpus shard that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class SelectedShard:
    """One method's selected documents of one shard as zstd JSON lines, and what the join by doc_id found."""

    data: bytes
    documents: int
    ids_not_found: int  # selected ids the shard's kept documents do not hold
    text_hash_mismatches: int  # texts whose hash is not the one embedded (or the one their doc_id ends with)


def write_selected_shard(kept: pa.Table, selection: pa.Table, method: str, key: str,
                         embedded_hash: Mapping[str, str]) -> SelectedShard:
    """The documents of ``selection`` (doc_id, shard and the selection fields) that lie in shard ``key``, joined
    with the shard's kept documents by doc_id: each record is the original DCLM record (``fields``) plus text,
    doc_id and ``selection`` (method and the selection fields), in the shard's own order. Not in the selection's
    order: a Group-MATES selection lists a cluster's picks together, and packing documents in that order would
    fill each training context with near-duplicates of one cluster, which no other method's corpus has."""
    mine = selection.filter(pc.equal(selection.column("shard"), key))
    in_selection = pc.is_in(kept.column("doc_id"), value_set=mine.column("doc_id"))
    found = kept.filter(in_selection)
    fields_of = pc.index_in(found.column("doc_id"), value_set=mine.column("doc_id"))
    selection_fields = mine.take(fields_of).drop_columns(["doc_id", "shard"]).to_pylist()
    not_found = pc.sum(pc.invert(pc.is_in(mine.column("doc_id"), value_set=kept.column("doc_id")))).as_py() or 0
    buffer, mismatched = io.BytesIO(), 0
    with zstandard.ZstdCompressor(level=3).stream_writer(buffer, closefd=False) as out:
        for record, extra in zip(found.to_pylist(), selection_fields, strict=True):
            digest = text_hash(record["text"])
            if digest != embedded_hash.get(record["doc_id"]) or not record["doc_id"].endswith(digest):
                mismatched += 1
            line = {**json.loads(record["fields"] or "{}"), "text": record["text"], "doc_id": record["doc_id"],
                    "selection": {"method": method, **finite(extra)}}
            out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return SelectedShard(buffer.getvalue(), found.num_rows, not_found, mismatched)


def read_selected_shard(data: bytes, name: str) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every record of a zstd JSON-lines shard written by the selected_corpus asset."""
    try:
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except zstandard.ZstdError as exc:
        raise CorpusShardError(f"{name}: not a readable zstd stream ({exc})") from exc
    for line_number, line in enumerate(raw.splitlines(), 1):
        try:
            record = json.loads(line)
            yield str(record["doc_id"]), str(record["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorpusShardError(f"{name}, line {line_number}: not a selected-corpus record ({exc})") from exc


def passes_needed(corpus_tokens: int, budget_tokens: int) -> int:
    """Data passes so the corpus covers the budget (at least one)."""
    if corpus_tokens <= 0:
        raise ValueError("the selected corpus holds no tokens")
    return max(1, math.ceil(budget_tokens / corpus_tokens))


def training_order(n_contexts: int, passes: int, seed: int, budget_contexts: int | None = None,
                   num_cells: int = tk.DCLM_NUM_LOCAL_CELLS) -> np.ndarray:
    """Context indices in training order: ``passes`` seeded shuffles one after another, cut at the budget.
    Every context appears exactly once in every complete pass."""
    order = np.concatenate([tk.shuffle_order(n_contexts, tk.derive_seed(seed, f"pass-{p}"), num_cells)
                            for p in range(passes)]) if passes else np.zeros(0, dtype=np.int64)
    return order[:budget_contexts] if budget_contexts is not None else order


@dataclass(frozen=True)
class SelectedCorpus:
    """One method's selected documents over every shard, in shard order, and each shard file's sha256."""

    doc_ids: list[str]
    texts: list[str]
    shard_hashes: dict[str, str]


def read_selected_corpus(storage: Storage, keys: list[str], method: str) -> SelectedCorpus:
    """Every shard's selected documents of ``method``; fails naming the shards selected_corpus has not written."""
    layout.require_files(storage, {k: f"{layout.SELECTED_CORPUS_DIR}/_stats/{k}.json" for k in keys}, "selected_corpus")
    doc_ids, texts, shard_hashes = [], [], {}
    for key in keys:
        path = f"{layout.SELECTED_CORPUS_DIR}/{method}/{key}.jsonl.zst"
        shard_hashes[key] = storage.read_json(f"{layout.SELECTED_CORPUS_DIR}/_stats/{key}.json")["sha256"][method]
        for doc_id, text in read_selected_shard(storage.read_bytes(path), storage.url(path)):
            doc_ids.append(doc_id)
            texts.append(text)
    return SelectedCorpus(doc_ids, texts, shard_hashes)


@dataclass(frozen=True)
class TrainingPlan:
    """Which packed contexts are trained on, in which order, for every seed's run."""

    usable: np.ndarray  # context indices without the padded tail, which is never trained on
    passes: int
    orders: np.ndarray  # int64 [seeds, training contexts]: indices into the packed contexts

    @property
    def complete_passes(self) -> int:
        return self.orders.shape[1] // len(self.usable) if len(self.usable) else 0

    def every_pass_complete(self) -> bool:
        """Every complete data pass of every order visits every usable context exactly once."""
        n = len(self.usable)
        return all(np.array_equal(np.sort(order[p * n:(p + 1) * n]), self.usable)
                   for order in self.orders for p in range(self.complete_passes))


def plan_training(packed: tk.PackedContexts, budget_tokens: int, seeds: int, seed: int, method: str) -> TrainingPlan:
    """Enough seeded passes over the usable contexts to cover the token budget, cut at it; run r of ``seeds``
    shuffles with seed ``seed + r`` (derived with the method's name, so methods never share an order)."""
    seq_len = packed.context_len - 1
    usable = np.setdiff1d(np.arange(packed.n_contexts), [packed.pad_context])
    passes = passes_needed(len(usable) * seq_len, budget_tokens)
    budget_contexts = -(-budget_tokens // seq_len)
    orders = np.stack([usable[training_order(len(usable), passes, tk.derive_seed(seed + run, method),
                                             budget_contexts)] for run in range(seeds)])
    return TrainingPlan(usable, passes, orders.astype(np.int64))
