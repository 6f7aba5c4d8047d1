"""What several stages need of other stages' outputs where Dagster is involved (the instance's pool partitions, a
step's context, a PermanentFailure): kept out of the stage folders, so that no stage imports another stage's
module. Paths and pointers themselves are in ``lib/layout.py``."""

import contextlib
import time
from collections.abc import Iterator

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.deployment import leased_gpus
from groupmates_assets.defs.partitions import block_number, pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import layout, lm, plots
from groupmates_assets.lib import oracle as oracle_lib
from groupmates_assets.lib import reference_set as ref_lib
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.contexts import PoolContexts, ShardContexts
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import LMProfile


def current_shard_keys(instance: dg.DagsterInstance, platform: PlatformResource) -> list[str]:
    """Partitions of ``pool_shards`` whose shard file is in the pool directory now, sorted: the pool is what the
    folder holds (a partition whose file vanished is deleted by the sensor's next tick, and not read before)."""
    fs, root = platform.pool_location()
    present = {shard.key for shard in shard_io.discover_shards(fs, root)[0]}
    return sorted(key for key in instance.get_dynamic_partitions(pool_shards.name) if key in present)


def context_len(platform: PlatformResource) -> int:
    """seq_len + 1 tokens per context: inputs and next-token targets of one training sequence."""
    return lm.get_shape(platform.settings().lm.shape).seq_len + 1


def optim_config(profile: LMProfile) -> lm.OptimConfig:
    return lm.OptimConfig(lr=profile.lr, weight_decay=profile.weight_decay, warmup_steps=profile.warmup_steps,
                          total_steps=profile.total_steps, final_lr=profile.final_lr)


def tokenized_pool(storage: Storage, instance: dg.DagsterInstance) -> tuple[PoolContexts, list[dict]]:
    """Every completely tokenized shard of the current pool (registered ``pool_shards`` partitions), as one
    sequence of contexts, plus their manifests (lineage). Storage may hold shards of a pool seen before."""
    manifests, shards = [], []
    pool = set(instance.get_dynamic_partitions(pool_shards.name))
    for key in storage.list(layout.TOKENIZED_POOL_DIR):
        if key not in pool:
            continue
        out = layout.TOKENIZED_DIR.format(key=key)
        if not storage.exists(f"{out}/manifest.json"):
            continue
        manifest = storage.read_json(f"{out}/manifest.json")
        manifests.append(manifest)
        shards.append(ShardContexts(key, storage.read_numpy(f"{out}/contexts.npy"), manifest["pad_context"]))
    if not shards:
        raise PermanentFailure("no tokenized shards: materialize tokenized_pool_shard partitions first")
    return PoolContexts(shards), manifests


@contextlib.contextmanager
def local_probe_checkpoint(storage: Storage) -> Iterator[tuple[str, str]]:
    """(local directory, model sha256) of the stored probe checkpoint; from an object store, downloaded once per
    machine (every oracle block reads it)."""
    if not storage.exists(f"{layout.PROBE_CHECKPOINT_DIR}/trainer_state.json"):
        raise PermanentFailure("no probe checkpoint: materialize probe_checkpoint first")
    sha = storage.info(f"{layout.PROBE_CHECKPOINT_DIR}/model.safetensors").sha256
    with storage.local_dir(layout.PROBE_CHECKPOINT_DIR, layout.PROBE_CHECKPOINT_FILES, cache=True) as local:
        yield local, sha


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
    pool_ids = storage.read_parquet(f"{layout.PROBE_POOL_DIR}/contexts.parquet").column("context_id").to_pylist()
    with storage.local_copy(layout.REFERENCE_FILE) as local:
        reference = ref_lib.load_reference_set(local)
    with leased_gpus(context) as gpus, local_probe_checkpoint(storage) as (checkpoint_dir, checkpoint_sha), \
            storage.local_copy(f"{layout.PROBE_POOL_DIR}/contexts.npy", cache=True) as pool_path:
        state = lm.read_trainer_state(checkpoint_dir)
        fingerprint = layout.fingerprint(checkpoint=checkpoint_sha,
                                         pool=storage.info(f"{layout.PROBE_POOL_DIR}/contexts.npy").sha256,
                                         reference=reference.sha256, length=length,
                                         part_size=oracle_settings.part_size, **fingerprint_parts)
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
        table = pa.concat_tables([storage.read_parquet(p) for p in parts])
        passed, details = oracle_lib.check_labels(table, length, per_block)
        sample = oracle_lib.replay_rows(table.num_rows, oracle_settings.replay_per_block, oracle_settings.seed, block)
        replayed, replay_details = oracle_lib.replay_final_losses(
            table, sample, checkpoint_dir, np.load(pool_path, mmap_mode="r", allow_pickle=False),
            lm.ReferenceBatch(reference.examples), oracle_settings.replay_tolerance, device=job.device,
            torch_threads=job.torch_threads)
        context.log.info(f"{block_key}: replayed {len(replay_details['replayed'])} trajectories from the checkpoint, "
                         f"max |difference| {replay_details['replay_max_abs_difference']:.3g}")
    passed, details = passed and replayed, {**details, **replay_details}
    resumed = job.parts - len(pending)
    computed = sum(job.part_rows(n).stop - job.part_rows(n).start for n in pending)
    storage.write_json(f"{out}/_SUCCESS.json", {"block": block_key, "fingerprint": fingerprint, "parts": parts,
                                                "trajectories": table.num_rows, **details})
    layout.write_pointer(storage, root_dir, {"fingerprint": fingerprint, "checkpoint_sha256": checkpoint_sha,
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
