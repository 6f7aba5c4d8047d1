"""Reference loss L_r (method spec §3.1, Stage 5): mean token CE on the answer tokens of the reference set.

It is evaluated after every probe step (200k times per oracle round), so it is built for speed:
  * examples are cut after their last scored position (causality: later tokens cannot affect it), sorted by
    length and packed into right-padded chunks trimmed to the chunk's longest example, with chunk boundaries
    chosen to minimise padding (right padding under a causal mask leaves real tokens untouched, so no
    attention mask is needed);
  * the 50k-vocab head runs only on the scored rows: the base model gives hidden states, the positions whose
    label != -100 are gathered, and only those go through ``lm_head`` + CE. With ~5 answer tokens per ~40-token
    example this removes ~90% of the head's cost, which otherwise dominates;
  * ``torch.inference_mode()``, bf16 autocast on CUDA only; packed chunks are cached per device.
Averaging: the micro-average over all scored tokens of all examples. The research code averaged the two
per-batch token means of its 64-example batches; the two agree when both batches score the same number of
tokens, and the micro-average does not depend on batch composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from groupmates_assets.lib.lm.model import autocast_for, model_device

IGNORE_INDEX = -100
# Fixed cost of one forward (Python/kernel launches, smaller GEMMs), in padded-token equivalents: trades
# padding against the number of forwards when packing.
FORWARD_OVERHEAD_TOKENS = 64


@dataclass(frozen=True)
class _Chunk:
    inputs: torch.Tensor  # [b, L] right-padded input ids
    positions: torch.Tensor  # [n] flat indices (row * L + col) of scored positions
    targets: torch.Tensor  # [n] target ids at those positions


@dataclass
class ReferenceBatch:
    """Reference examples as ``(input_ids, labels)`` with ``labels == -100`` on unscored (prompt) tokens.

    Labels are aligned with ``input_ids`` (HF convention): the model's output at position t is scored
    against ``labels[t + 1]``. Examples are truncated to ``max_length`` tokens as the research collate did.
    """

    examples: list[tuple[list[int], list[int]]]
    max_length: int = 2048
    _cache: dict[tuple[int, str], list[_Chunk]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cleaned = []
        for i, (ids, labels) in enumerate(self.examples):
            ids, labels = [int(t) for t in ids], [int(t) for t in labels]
            if len(ids) != len(labels):
                raise ValueError(f"example {i}: {len(ids)} input_ids but {len(labels)} labels")
            cleaned.append((ids[: self.max_length], labels[: self.max_length]))
        self.examples = cleaned
        if self.n_scored_tokens == 0:
            raise ValueError("reference set has no scored (label != -100) tokens after the shift")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_scored_tokens(self) -> int:
        return sum(sum(1 for t in labels[1:] if t != IGNORE_INDEX) for _, labels in self.examples)

    def chunks(self, max_tokens_per_forward: int, device: torch.device) -> list[_Chunk]:
        """Length-sorted, right-padded packs of at most ``max_tokens_per_forward`` input positions
        (a single longer example gets a chunk of its own); cached per budget and device."""
        key = (int(max_tokens_per_forward), str(device))
        if key not in self._cache:
            self._cache[key] = self._pack(max_tokens_per_forward, device)
        return self._cache[key]

    def _pack(self, max_tokens: int, device: torch.device) -> list[_Chunk]:
        items = []
        for ids, labels in self.examples:
            scored = [t for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
            if scored:  # examples with nothing to score contribute nothing to a micro-average
                # causal: inputs after the last scored position cannot change any scored output, drop them
                items.append((ids[: scored[-1] + 1], scored, [labels[t + 1] for t in scored]))
        items.sort(key=lambda item: len(item[0]))
        chunks = []
        for start, stop in _partition([len(ids) for ids, _, _ in items], max_tokens):
            group = items[start:stop]
            width = len(group[-1][0])  # sorted: the last is the longest
            inputs = torch.zeros((len(group), width), dtype=torch.long)
            positions, targets = [], []
            for row, (ids, scored, tgts) in enumerate(group):
                inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                positions.extend(row * width + t for t in scored)
                targets.extend(tgts)
            chunks.append(_Chunk(inputs.to(device), torch.tensor(positions, dtype=torch.long, device=device),
                                 torch.tensor(targets, dtype=torch.long, device=device)))
        return chunks


def _partition(lengths: list[int], max_tokens: int, overhead: int | None = None) -> list[tuple[int, int]]:
    """Split ascending ``lengths`` into contiguous chunks minimising padded positions + ``overhead`` per forward,
    each chunk within ``max_tokens`` positions (a single longer example stands alone). Exact O(n²) DP."""
    overhead = FORWARD_OVERHEAD_TOKENS if overhead is None else overhead
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[j]: cost of packing the first j items
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        width = lengths[stop - 1]
        for start in range(stop - 1, -1, -1):
            rows = stop - start
            if rows > 1 and rows * width > max_tokens:
                break
            cost = best[start] + rows * width + overhead
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    bounds = []
    stop = n
    while stop > 0:
        bounds.append((cut[stop], stop))
        stop = cut[stop]
    return bounds[::-1]


def reference_loss(model: torch.nn.Module, ref: ReferenceBatch, max_tokens_per_forward: int = 16384) -> float:
    """Mean CE over all scored tokens of ``ref`` (see module docstring); the model's train/eval mode is kept."""
    device = model_device(model)
    base = model.base_model  # the decoder stack ending in the final norm
    head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_for(device):
            total = torch.zeros((), dtype=torch.float64, device=device)
            for chunk in ref.chunks(max_tokens_per_forward, device):
                hidden = base(input_ids=chunk.inputs).last_hidden_state
                rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, chunk.positions)
                logits = head(rows).float()
                total += F.cross_entropy(logits, chunk.targets, reduction="sum").double()
        return float(total) / ref.n_scored_tokens
    finally:
        model.train(was_training)
