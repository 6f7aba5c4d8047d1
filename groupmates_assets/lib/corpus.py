"""A selected corpus as LM training data: read the selected shards, pack them, and plan the data passes.

The corpus is packed once (DCLM's tokenize-shuffle: documents + EOT, contexts of seq_len + 1 tokens); when it
holds fewer tokens than the training budget, the contexts are repeated in several passes, each pass its own
seeded shuffle (DCLM's multiple data passes), and the training order is cut at the budget.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator

import numpy as np
import zstandard

from groupmates_assets.lib import tokenization as tk


class CorpusShardError(ValueError):
    """A selected-corpus shard that cannot be read; the message names the file and line."""


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
