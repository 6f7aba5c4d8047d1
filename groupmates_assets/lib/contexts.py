"""Packed LM contexts across tokenized shards, addressed by stable ids ``<shard key>:<context number>``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ShardContexts:
    key: str
    tokens: np.ndarray  # [n, context_len], usually a read-only memmap
    pad_context: int  # the one context holding tail padding, or -1


class PoolContexts:
    """All usable contexts of several tokenized shards as one indexable sequence.

    The single padded tail context of each shard is left out, so every position of every context is a real
    token and no loss mask is needed downstream.
    """

    def __init__(self, shards: Sequence[ShardContexts]):
        if not shards:
            raise ValueError("no tokenized shards")
        lengths = {s.tokens.shape[1] for s in shards}
        if len(lengths) != 1:
            raise ValueError(f"tokenized shards disagree on the context length: {sorted(lengths)}")
        self.context_len = lengths.pop()
        self.shards = list(shards)
        keep = [np.setdiff1d(np.arange(s.tokens.shape[0]), [s.pad_context]) for s in self.shards]
        self._shard_of = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(keep)])
        self._row_of = np.concatenate(keep).astype(np.int64)

    def __len__(self) -> int:
        return len(self._row_of)

    def tokens(self, index: int) -> np.ndarray:
        return np.asarray(self.shards[self._shard_of[index]].tokens[self._row_of[index]])

    def context_id(self, index: int) -> str:
        return f"{self.shards[self._shard_of[index]].key}:{int(self._row_of[index])}"

    def gather(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([self.tokens(int(i)) for i in indices]) if len(indices) else np.zeros(
            (0, self.context_len), dtype=np.uint32)

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless [batch_size, context_len] int64 batches in a seeded order, reshuffled every pass."""
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(self))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield torch.from_numpy(self.gather(order[start:start + batch_size]).astype(np.int64))

    def sample(self, size: int, seed: int) -> np.ndarray:
        """``size`` distinct context indices drawn uniformly under a seed (the probe pool)."""
        if size > len(self):
            raise ValueError(f"asked for {size} contexts but the tokenized pool holds {len(self)}")
        return np.sort(np.random.default_rng(seed).choice(len(self), size=size, replace=False))
