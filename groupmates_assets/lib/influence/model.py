"""The relational data influence model (method.md 3.4) and its individual-only variant (MATES).

An encoder gives each document an embedding h: the first-token vector of each chunk that holds text,
L2-normalised, averaged over those chunks (``reference_empty_chunks`` reproduces the reference code, which also
averaged all-padding chunks). The individual influence is ``u = w.h + b``. For item t of a trajectory

    pred_1 = u_1,    pred_t = alpha * u_t * mean_{i<t} (1 - <h_i, h_t> / tau)

with alpha and tau learnable (initialised to 1). The mask is per trajectory: a batch of trajectories gives the
same predictions as each alone (the reference masked across the whole batch). Because the factor is linear in
the similarities, ``pred_t = alpha * u_t * (1 - <h_t, mean_{i<t} h_i> / tau)``: the closed form used by
bootstrap beams and greedy selection.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from groupmates_assets.lib import failpoints
from groupmates_assets.lib.influence.encoder import ChunkedDocuments, quiet_transformers
from groupmates_assets.lib.storage import Storage

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "influence_config.json"
ENCODER_DIR = "encoder"
MODEL_FILES = (MODEL_FILE, CONFIG_FILE, f"{ENCODER_DIR}/config.json", f"{ENCODER_DIR}/tokenizer.json")


@dataclass
class InfluenceModelConfig:
    """What a saved model needs to be rebuilt and used without the code that trained it."""

    relational: bool = True
    chunk_len: int = 512
    chunks: int = 4
    reference_empty_chunks: bool = False
    encoder_name: str = ""
    encoder_origin: str = ""
    encoder_layers: int | None = None
    dropout: float = 0.1
    label_mean: float = 0.0  # z-score statistics of the marginal labels (training split only)
    label_std: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def relational_predictions(h: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor | float,
                           tau: torch.Tensor | float) -> torch.Tensor:
    """[B, T] predictions for B trajectories of T items: h [B, T, d], u [B, T]; masked per trajectory."""
    length = h.shape[1]
    similarity = torch.einsum("btd,bsd->bts", h, h)
    earlier = torch.ones(length, length, device=h.device, dtype=h.dtype).tril(-1)
    prefix = torch.arange(length, device=h.device, dtype=h.dtype).clamp(min=1)
    factor = ((1 - similarity / tau) * earlier).sum(-1) / prefix
    return torch.cat([u[:, :1], (alpha * u * factor)[:, 1:]], dim=1)


def closed_form_scores(u: torch.Tensor, h: torch.Tensor, selected_mean: torch.Tensor | None,
                       alpha: torch.Tensor | float, tau: torch.Tensor | float) -> torch.Tensor:
    """Predicted marginal influence of every candidate given a selected set with mean embedding ``selected_mean``
    (None: nothing selected yet, so the prediction is u). ``selected_mean`` may be [d] or [B, d] for B sets."""
    if selected_mean is None:
        return u
    return alpha * u * (1 - (selected_mean @ h.T) / tau)


def _chunk_batches(lengths: np.ndarray, max_tokens: int, sort: bool) -> Iterator[np.ndarray]:
    """Positions of chunks grouped so each padded batch holds at most ``max_tokens`` tokens."""
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    start = 0
    while start < len(order):
        width = int(lengths[order[start]]) if sort else 0
        end = start
        while end < len(order):
            width = max(width, int(lengths[order[end]]))
            if (end - start + 1) * width > max_tokens and end > start:
                break
            end += 1
        yield order[start:end]
        start = end


class InfluenceModel(torch.nn.Module):
    """Encoder + linear head (+ alpha, tau when relational). ``relational=False`` is the MATES model."""

    def __init__(self, encoder: torch.nn.Module, config: InfluenceModelConfig):
        super().__init__()
        self.encoder, self.config = encoder, config
        hidden = encoder.config.hidden_size
        self.dropout = torch.nn.Dropout(config.dropout)
        self.head = torch.nn.Linear(hidden, 1)
        if config.relational:
            self.alpha = torch.nn.Parameter(torch.tensor(1.0))
            self.tau = torch.nn.Parameter(torch.tensor(1.0))

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def alpha_tau(self) -> tuple[float, float]:
        if not self.config.relational:
            return 1.0, 1.0
        return float(self.alpha.detach()), float(self.tau.detach())

    # -- embeddings -----------------------------------------------------------------------------------------
    def _first_token_vectors(self, tokens: Sequence[np.ndarray], width: int) -> torch.Tensor:
        ids = torch.zeros((len(tokens), width), dtype=torch.long)
        mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for row, chunk in enumerate(tokens):
            ids[row, :len(chunk)] = torch.from_numpy(chunk)
            mask[row, :len(chunk)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _nullcontext()
        with autocast:
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        return F.normalize(hidden.float(), dim=-1)

    def embed(self, docs: ChunkedDocuments, indices: Sequence[int], max_tokens: int = 16384,
              layout: str = "trimmed") -> torch.Tensor:
        """[len(indices), d] embeddings h. ``trimmed``: only chunks with text, length-sorted, padded per batch;
        ``padded``: the reference layout (every chunk padded to chunk_len, all-padding chunks computed too)."""
        indices = np.asarray(indices, dtype=np.int64)
        chunk_ids = docs.chunks_of(indices)
        owner = np.repeat(np.arange(len(indices)), docs.doc_chunks[indices + 1] - docs.doc_chunks[indices])
        tokens = [docs.chunk_tokens[c] for c in chunk_ids]
        padded = layout == "padded" or self.config.reference_empty_chunks
        if padded:  # append the all-padding chunks each document lacks, as the reference's reshape makes them
            counts = np.bincount(owner, minlength=len(indices))
            missing = np.repeat(np.arange(len(indices)), docs.chunks - counts)
            tokens += [np.zeros(0, dtype=np.int64)] * len(missing)
            owner = np.concatenate([owner, missing])
        lengths = np.array([docs.chunk_len if padded else len(t) for t in tokens], dtype=np.int64)
        total = torch.zeros((len(indices), self.hidden_size), device=self.device)
        count = torch.zeros(len(indices), device=self.device)
        for batch in _chunk_batches(lengths, max_tokens, sort=not padded):
            vectors = self._first_token_vectors([tokens[i] for i in batch], int(lengths[batch].max()))
            if padded and not self.config.reference_empty_chunks:
                keep = torch.tensor([len(tokens[i]) > 0 for i in batch], device=self.device)
                vectors = vectors * keep[:, None]
                batch_counts = keep.float()
            else:
                batch_counts = torch.ones(len(batch), device=self.device)
            where = torch.as_tensor(owner[batch], device=self.device)
            total = total.index_add(0, where, vectors)
            count = count.index_add(0, where, batch_counts)
        return total / count.clamp(min=1)[:, None]

    def individual(self, h: torch.Tensor) -> torch.Tensor:
        """u = w.h + b (dropout on h while training, as the reference head)."""
        return self.head(self.dropout(h)).squeeze(-1)

    def trajectory_predictions(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[B, T] predicted marginal influences; the individual model predicts u at every position."""
        if not self.config.relational:
            return u
        return relational_predictions(h, u, self.alpha, self.tau)

    def forward(self, docs: ChunkedDocuments, trajectories: np.ndarray, max_tokens: int = 16384) -> torch.Tensor:
        """Predictions for [B, T] document indices into ``docs``."""
        batch, length = trajectories.shape
        h = self.embed(docs, trajectories.reshape(-1), max_tokens=max_tokens)
        u = self.individual(h)
        return self.trajectory_predictions(h.view(batch, length, -1), u.view(batch, length))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def embed_documents(model: InfluenceModel, docs: ChunkedDocuments, batch_docs: int = 256, max_tokens: int = 16384,
                    log: Callable[[str], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, u) of every document on the CPU, eval mode; documents go longest first so each batch carries little
    padding, and progress goes to ``log`` every 10 batches."""
    model.eval()
    lengths = np.add.reduceat(docs.token_counts, docs.doc_chunks[:-1]) if len(docs) else np.zeros(0, np.int64)
    order = np.argsort(-lengths, kind="stable")
    h, u = torch.zeros((len(docs), model.hidden_size)), torch.zeros(len(docs))
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(docs), batch_docs):
            rows = torch.as_tensor(order[start:start + batch_docs])
            vectors = model.embed(docs, rows.numpy(), max_tokens=max_tokens)
            h[rows] = vectors.float().cpu()
            u[rows] = model.individual(vectors).float().cpu()
            failpoints.hit("predict.batch")
            done = min(start + batch_docs, len(docs))
            if log and (done == len(docs) or (start // batch_docs) % 10 == 9):
                log(f"embedded {done:,}/{len(docs):,} documents ({done / (time.perf_counter() - started):,.1f}/s)")
    return h, u


# ------------------------------------------------------------------------------------------- persistence


def build_model(source, config: InfluenceModelConfig, seed: int = 0) -> InfluenceModel:
    """A fresh model from a pretrained encoder (``source``: an EncoderSource). The new head is drawn from
    ``seed`` alone, not from whatever the process's global generator went through before, so two runs of one
    configuration train the same model."""
    from groupmates_assets.lib.influence.encoder import load_pretrained_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = load_pretrained_encoder(source, config.encoder_layers)
        return InfluenceModel(encoder, config)


def save_model(model: InfluenceModel, directory: str, tokenizer_json: str) -> None:
    """Weights (safetensors), our config, and the encoder's config and tokenizer, written atomically."""
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".model-", dir=parent)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(staging, MODEL_FILE))
        with open(os.path.join(staging, CONFIG_FILE), "w") as fh:
            json.dump(asdict(model.config), fh, indent=2, sort_keys=True)
        os.makedirs(os.path.join(staging, ENCODER_DIR))
        model.encoder.config.to_json_file(os.path.join(staging, ENCODER_DIR, "config.json"))
        with open(os.path.join(staging, ENCODER_DIR, "tokenizer.json"), "w") as fh:
            fh.write(tokenizer_json)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_config(directory: str) -> InfluenceModelConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a saved influence model (no {CONFIG_FILE})")
    with open(path) as fh:
        return InfluenceModelConfig(**json.load(fh))


def local_model_dir(storage: Storage, relative_dir: str) -> AbstractContextManager[str]:
    """A local directory holding a saved model (works for any storage root; from an object store, downloaded once
    per machine into the local object cache and reused by every later run until the model changes)."""
    return storage.local_dir(relative_dir, MODEL_FILES, cache=True)


def load_model(directory: str, device: str | torch.device | None = None) -> InfluenceModel:
    """A saved model, rebuilt from its own files only (no hub, no pickle), in eval mode."""
    from transformers import AutoConfig, AutoModel

    config = read_config(directory)
    with quiet_transformers():
        encoder_config = AutoConfig.from_pretrained(os.path.join(directory, ENCODER_DIR), local_files_only=True)
        # fp32 whatever dtype the saved config names (transformers builds in ``config.dtype``)
        encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False, dtype=torch.float32)
    model = InfluenceModel(encoder, config)
    model.load_state_dict(load_file(os.path.join(directory, MODEL_FILE)))
    return model.to(device or "cpu").eval()


def load_tokenizer(directory: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(directory, ENCODER_DIR, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
