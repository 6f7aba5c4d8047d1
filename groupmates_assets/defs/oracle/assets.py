"""Oracle stage: the reference set, the probe pool, and oracle influences of random trajectories."""

import os
import tempfile
import time

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from groupmates_assets.defs.common import fingerprint as input_fingerprint
from groupmates_assets.defs.deployment import STEP_RETRY, gpu_asset_args, leased_gpus
from groupmates_assets.defs.lm.assets import local_probe_checkpoint, probe_checkpoint
from groupmates_assets.defs.partitions import oracle_random_blocks
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.tokenize.assets import tokenized_pool, tokenized_pool_shard
from groupmates_assets.lib import lm, plots
from groupmates_assets.lib import oracle as oracle_lib
from groupmates_assets.lib import reference_set as ref_lib
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.settings import METHOD

REFERENCE_FILE = "oracle/reference_set.jsonl"
PROBE_POOL_DIR = "oracle/probe_pool"
ORACLE_RANDOM_DIR = "oracle/random"


@dg.asset(
    group_name="oracle",
    code_version="reference-set-v1",
    retry_policy=STEP_RETRY,
    kinds={"json"},
    description="The examples whose loss defines data influence: instruction-style question/answer pairs "
    "(loss on answer tokens only) from a registry package, disjoint from the evaluation tasks.",
)
def reference_set(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings()
    tokenizer = tk.load_tokenizer(settings.tokenize.tokenizer)
    reference = ref_lib.build_reference_set(tokenizer, settings.oracle.reference_source,
                                            settings.oracle.reference_size)
    with tempfile.TemporaryDirectory(prefix="groupmates-ref-") as tmp:
        local = os.path.join(tmp, "reference_set.jsonl")
        ref_lib.save_reference_set(reference, local)
        info = storage.put_file(local, REFERENCE_FILE)
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


@dg.asset(
    group_name="oracle",
    code_version="probe-pool-v1",
    retry_policy=STEP_RETRY,
    deps=[dg.AssetDep(tokenized_pool_shard, partition_mapping=dg.AllPartitionMapping())],
    kinds={"numpy"},
    description="The contexts oracle trajectories draw from (paper: 81,920 packed contexts), sampled uniformly "
    "from the tokenized pool, each with a stable context id.",
)
def probe_pool(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings().oracle
    pool, _ = tokenized_pool(storage, context.instance)
    size = min(settings.probe_pool_size, len(pool))
    if size < settings.probe_pool_size:
        context.log.warning(f"the tokenized pool holds {len(pool)} contexts; the probe pool takes all of them "
                            f"instead of {settings.probe_pool_size}")
    chosen = pool.sample(size, settings.seed)
    tokens = storage.write_numpy(f"{PROBE_POOL_DIR}/contexts.npy", pool.gather(chosen))
    ids = [pool.context_id(int(i)) for i in chosen]
    table = storage.write_parquet(f"{PROBE_POOL_DIR}/contexts.parquet", pa.table({"row": np.arange(size),
                                                                                  "context_id": ids}))
    shards = sorted({i.rsplit(":", 1)[0] for i in ids})
    return dg.MaterializeResult(
        metadata={"dagster/row_count": size, "contexts": size, "context_len": pool.context_len,
                  "shards": len(shards), "tokenized_pool_contexts": len(pool), "tokens_sha256": tokens.sha256,
                  "path": dg.MetadataValue.path(tokens.path), "ids_path": dg.MetadataValue.path(table.path)},
        data_version=dg.DataVersion(tokens.sha256[:16]),
    )


@dg.asset(
    partitions_def=oracle_random_blocks,
    group_name="oracle",
    code_version="oracle-random-v1",
    deps=[probe_checkpoint, probe_pool, reference_set],
    kinds={"pytorch", "parquet"},
    check_specs=[dg.AssetCheckSpec(
        "labels_consistent", asset="oracle_random", blocking=True,
        description="every trajectory complete (T distinct contexts, finite labels) and telescoping: "
        "sum of marginal labels = L_r(M_T+1) - L_r(M_1)",
    )],
    description="Oracle data influences of random trajectories: from the probe checkpoint (model and optimizer "
    "restored per trajectory), T contexts one AdamW step each, the reference loss after every step. One "
    "partition = one block of trajectories, resumable part by part.",
    **gpu_asset_args(partitioned=True),
)
def oracle_random(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    oracle_settings, block_key = platform.settings().oracle, context.partition_key
    block = block_number(block_key)
    per_block, pool_size = oracle_settings.trajectories_per_block, probe_pool_size(platform.storage())
    return collect_oracle_block(
        context, platform, root_dir=ORACLE_RANDOM_DIR,
        plan=oracle_lib.random_plan(pool_size, per_block, METHOD.trajectory_length, oracle_settings.seed, block),
        trajectory_ids=np.arange(block * per_block, (block + 1) * per_block), policy="random",
        fingerprint_parts={"seed": oracle_settings.seed, "per_block": per_block, "policy": "random"},
    )


def block_number(block_key: str) -> int:
    """``block-007`` -> 7 (keys come from a static partitions definition, so anything else is a bug)."""
    prefix, _, number = block_key.partition("-")
    if prefix != "block" or not (number.isascii() and number.isdigit()):
        raise ValueError(f"not an oracle block key: {block_key!r}")
    return int(number)


def probe_pool_size(storage) -> int:
    return storage.read_parquet(f"{PROBE_POOL_DIR}/contexts.parquet", columns=["row"]).num_rows


def collect_oracle_block(context: dg.AssetExecutionContext, platform: PlatformResource, *, root_dir: str,
                         plan: np.ndarray, trajectory_ids: np.ndarray,
                         policy: str | tuple[str, ...], fingerprint_parts: dict) -> dg.MaterializeResult:
    """Run (or resume) one block of oracle trajectories and report it; shared by every rollout policy.

    Output goes to ``<root_dir>/<fingerprint>/<block>/part-NNNNN.parquet``; the fingerprint covers the checkpoint,
    the probe pool, the reference set and the plan's inputs, so changed inputs never mix with old parts.
    """
    storage, settings = platform.storage(), platform.settings()
    oracle_settings, block_key = settings.oracle, context.partition_key
    block, length, per_block = block_number(block_key), plan.shape[1], len(plan)
    pool_ids = storage.read_parquet(f"{PROBE_POOL_DIR}/contexts.parquet").column("context_id").to_pylist()
    with storage.local_copy(REFERENCE_FILE) as local:
        reference = ref_lib.load_reference_set(local)
    with leased_gpus(context) as gpus, local_probe_checkpoint(storage) as (checkpoint_dir, checkpoint_sha), \
            storage.local_copy(f"{PROBE_POOL_DIR}/contexts.npy") as pool_path:
        state = lm.read_trainer_state(checkpoint_dir)
        fingerprint = input_fingerprint(checkpoint=checkpoint_sha,
                                   pool=storage.info(f"{PROBE_POOL_DIR}/contexts.npy").sha256,
                                   reference=reference.sha256, length=length, part_size=oracle_settings.part_size,
                                   **fingerprint_parts)
        out = f"{root_dir}/{fingerprint}/{block_key}"
        workers = max(1, oracle_settings.workers)
        job = oracle_lib.BlockJob(
            storage_root=platform.storage_root, out_dir=out, checkpoint_dir=checkpoint_dir, pool_path=pool_path,
            reference_examples=reference.examples, context_ids=pool_ids,
            plan=plan, trajectory_ids=trajectory_ids, block=block, policy=policy,
            part_size=oracle_settings.part_size, torch_threads=max(1, settings.lm.torch_threads // workers),
            device=f"cuda:{gpus[0]}" if gpus else None,
        )
        pending = [n for n in range(job.parts) if not storage.exists(job.part_path(n))]
        context.log.info(f"{block_key}: {per_block} trajectories x {length} steps from checkpoint step "
                         f"{state['step']} (lr {state['lr']:.3g}); {len(pending)} of {job.parts} parts to run on "
                         f"{workers} worker(s); writing to {storage.url(out)}")
        started = time.perf_counter()
        oracle_lib.run_block(job, pending, workers, progress=lambda done, total: context.log.info(
            f"{block_key}: {done}/{total} trajectories "
            f"({done * length / (time.perf_counter() - started) * 3600:,.0f} probes/hour)"))
    seconds = time.perf_counter() - started
    parts = [job.part_path(n) for n in range(job.parts)]
    resumed = job.parts - len(pending)
    computed = sum(job.part_rows(n).stop - job.part_rows(n).start for n in pending)
    table = pa.concat_tables([storage.read_parquet(p) for p in parts])
    passed, details = oracle_lib.check_labels(table, length, per_block)
    storage.write_json(f"{out}/_SUCCESS.json", {"block": block_key, "fingerprint": fingerprint, "parts": parts,
                                                "trajectories": table.num_rows, **details})
    storage.write_json(f"{root_dir}/current.json", {"fingerprint": fingerprint, "checkpoint_sha256": checkpoint_sha,
                                                    "reference_sha256": reference.sha256, **fingerprint_parts})
    marginal = pc.list_flatten(table.column("marginal")).to_numpy()
    edges = np.linspace(marginal.min(), marginal.max(), 21) if len(marginal) and marginal.min() < marginal.max() \
        else np.linspace(-1, 1, 21)
    png = plots.histogram_png(edges.tolist(), np.histogram(marginal, bins=edges)[0].tolist(),
                              f"{block_key}: marginal oracle influences", "change of reference loss",
                              ylabel="trajectory steps")
    probes = computed * length
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows, "trajectories": table.num_rows, "probes": table.num_rows * length,
            "computed_trajectories": computed, "resumed_parts": resumed,
            "probes_per_hour": round(probes / seconds * 3600, 1) if probes else None,
            "base_reference_loss": round(table.column("base_loss")[0].as_py(), 5),
            "marginal_mean": float(np.mean(marginal)), "marginal_std": float(np.std(marginal)),
            "fingerprint": fingerprint, "checkpoint_sha256": checkpoint_sha, "reference_sha256": reference.sha256,
            "marginal_histogram": dg.MetadataValue.md(plots.png_markdown(png, "marginal influences")),
            "path": dg.MetadataValue.path(storage.url(out)),
        },
        check_results=[dg.AssetCheckResult(check_name="labels_consistent", passed=passed, metadata=details,
                                           severity=dg.AssetCheckSeverity.ERROR)],
    )


def read_oracle_blocks(storage, root_dir: str, block_keys: list[str], asset_name: str) -> tuple[list[pa.Table], str]:
    """Every block of the current oracle labels under ``root_dir`` (tables, fingerprint); a missing block is an
    error that names it, never a silently smaller training set."""
    if not storage.exists(f"{root_dir}/current.json"):
        raise FileNotFoundError(f"no {asset_name} labels under {storage.url(root_dir)}; materialize {asset_name} first")
    fingerprint = storage.read_json(f"{root_dir}/current.json")["fingerprint"]
    tables, missing = [], []
    for key in block_keys:
        marker = f"{root_dir}/{fingerprint}/{key}/_SUCCESS.json"
        if not storage.exists(marker):
            missing.append(key)
            continue
        tables += [storage.read_parquet(p) for p in storage.read_json(marker)["parts"]]
    if missing:
        raise FileNotFoundError(f"{asset_name} blocks {', '.join(missing)} are not materialized for the current "
                                f"inputs (fingerprint {fingerprint}); materialize them before training on the labels")
    return tables, fingerprint
