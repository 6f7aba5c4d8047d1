"""Deterministic samples of pool documents (bottom-k by a hash of the doc id).

Bottom-k hashing gives a uniform sample that does not depend on shard order or on how many shards are
read at once, and needs one streaming pass with O(k) memory per shard.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from groupmates_assets.lib import shards as shard_io


@dataclass(frozen=True)
class SampledDoc:
    doc_id: str
    text: str
    group: str | None


def _rank(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")


def spread(items: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` items, evenly spaced over the sequence (first and last included)."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    step = (len(items) - 1) / max(limit - 1, 1)
    return [items[round(i * step)] for i in range(limit)]


def sample_shards(
    fs: Any,
    shards: Sequence[shard_io.ShardFile],
    total: int,
    seed: int = 1234,
    group_field: str | None = "source",
    on_unreadable: Callable[[shard_io.ShardReadError], None] | None = None,
    exclude: Callable[[str], bool] | None = None,
) -> list[SampledDoc]:
    """About ``total`` documents, an equal quota per shard, each quota the bottom-k of a seeded hash; texts for
    which ``exclude`` is true (the pool's held-out slice) are never drawn.

    A shard that cannot be read is passed to ``on_unreadable`` and left out (one broken file should not stop
    a sample), or raises when no handler is given.
    """
    if not shards or total <= 0:
        return []
    quota = math.ceil(total / len(shards))
    sample: list[SampledDoc] = []
    for shard in shards:
        heap: list[tuple[int, str, str, str | None]] = []  # max-heap via negated rank
        try:
            for batch in shard_io.read_shard(fs, shard, group_field=group_field):
                for line, text, group in zip(batch.lines, batch.texts, batch.groups, strict=True):
                    if exclude is not None and exclude(text):
                        continue
                    doc_id = shard_io.make_doc_id(shard.key, line, text)
                    rank = _rank(doc_id, seed)
                    if len(heap) < quota:
                        heapq.heappush(heap, (-rank, doc_id, text, group))
                    elif rank < -heap[0][0]:
                        heapq.heapreplace(heap, (-rank, doc_id, text, group))
        except shard_io.ShardReadError as exc:
            if on_unreadable is None:
                raise
            on_unreadable(exc)
            continue
        sample.extend(SampledDoc(d, t, g) for _, d, t, g in sorted(heap, key=lambda item: -item[0]))
    return sample[:total] if len(sample) > total else sample
