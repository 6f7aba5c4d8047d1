"""Causal stage: the actual reference-loss change of groups drawn from each method's selection, against random
groups of the filtered pool, at the probe checkpoint (the quantity Group-MATES optimises)."""

import os
import tempfile
import time

import dagster as dg
import numpy as np

from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.deployment import gpu_asset_args, leased_gpus, step_asset
from groupmates_assets.defs.partitions import SELECTION_METHODS
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import local_probe_checkpoint, tokenized_pool
from groupmates_assets.lib import causal, layout, lm, plots
from groupmates_assets.lib import reference_set as ref_lib
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.jsonsafe import finite
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import METHOD

INFLUENCES_VERSION = "selection-influence-v1"  # in the fingerprint: stored influences of older code are not reused
CODE_VERSION = "selection-influence-v2"  # v2: differences from the reference methods (causal.references) too


def corpus_set(storage: Storage, method: str) -> tuple[causal.GroupSet, str]:
    """(the method's tokenized corpus without its padded tail context, the corpus fingerprint)."""
    pointer = layout.current_corpus(storage, method)
    manifest = storage.read_json(f"{pointer['path']}/manifest.json")
    tokens = storage.read_numpy(f"{pointer['path']}/contexts.npy")
    rows = np.setdiff1d(np.arange(len(tokens)), [manifest["pad_context"]])
    return causal.GroupSet.from_rows(method, tokens, rows, f"{method}:{pointer['fingerprint']}"), \
        pointer["fingerprint"]


def group_sets(context: dg.AssetExecutionContext, storage: Storage,
               methods: tuple[str, ...]) -> tuple[list[causal.GroupSet], dict]:
    """The pool (every usable context of the tokenized filtered pool) and each method's corpus, with what
    identifies them (for the fingerprint)."""
    unknown = [m for m in methods if m not in SELECTION_METHODS]
    if unknown:
        raise PermanentFailure(f"causal.methods names unknown selection methods {unknown}; known: "
                               f"{', '.join(SELECTION_METHODS)}")
    pool, manifests = tokenized_pool(storage, context.instance)
    sets = [causal.GroupSet(causal.POOL, len(pool), pool.gather, pool.context_id)]
    identity = {"pool": sorted((m["shard_key"], m["files"]["contexts"]["sha256"]) for m in manifests)}
    for method in methods:
        group_set, fingerprint = corpus_set(storage, method)
        sets.append(group_set)
        identity[method] = fingerprint
    return sets, identity


@step_asset(
    group_name="causal",
    code_version=CODE_VERSION,
    deps=["probe_checkpoint", "reference_set", "influence_model_final",
          dg.AssetDep("tokenized_corpus", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("tokenized_pool_shard", partition_mapping=dg.AllPartitionMapping())],
    kinds={"pytorch", "json"},
    **gpu_asset_args(),
)
def selection_influence(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """A causal check of the selection: N groups of T packed training contexts from each method's corpus and N
    random groups of the filtered pool (group g of every set drawn under the same seed), each run as an oracle
    trajectory from the probe checkpoint; per method the mean actual change of the reference loss (negative =
    beneficial) minus random groups with a paired bootstrap 95% interval, and Spearman(final model's predicted
    group influence, actual). Resumes set by set."""
    storage, settings = platform.storage(), platform.settings()
    config, length = settings.causal, METHOD.trajectory_length
    sets, identity = group_sets(context, storage, config.methods)
    plan = causal.plan_groups(sets, config.groups, length, config.seed)
    model_pointer = layout.current_model(storage, "final")
    with storage.local_copy(layout.REFERENCE_FILE) as local:
        reference = ref_lib.load_reference_set(local)
    started = time.perf_counter()
    with leased_gpus(context) as gpus, local_probe_checkpoint(storage) as (checkpoint_dir, checkpoint_sha):
        fingerprint = layout.fingerprint(checkpoint=checkpoint_sha, reference=reference.sha256, sets=identity,
                                         model=model_pointer["fingerprint"], groups=config.groups, seed=config.seed,
                                         length=length, code=INFLUENCES_VERSION)
        out = f"{layout.CAUSAL_DIR}/{fingerprint}"
        pending = [n for n in plan.sets if not storage.exists(f"{out}/actual-{n}.json")]
        context.log.info(f"{config.groups} groups x {length} contexts for {', '.join(plan.sets)}; "
                         f"{len(pending)} set(s) to run on {config.workers} worker(s); writing to {storage.url(out)}")
        with tempfile.TemporaryDirectory(prefix="groupmates-causal-") as tmp:
            np.save(os.path.join(tmp, "contexts.npy"), plan.tokens)
            job = causal.GroupJob(checkpoint_dir, os.path.join(tmp, "contexts.npy"), reference.examples,
                                  torch_threads=max(1, settings.lm.torch_threads // config.workers),
                                  device=f"cuda:{gpus[0]}" if gpus else None)
            causal.run_sets(job, plan, pending, config.workers,
                            on_set=lambda name, actual, base: storage.write_json(
                                f"{out}/actual-{name}.json", {"set": name, "actual": actual, "base_loss": base}),
                            progress=lambda done, total: context.log.info(f"{done}/{total} groups")
                            if done == total or done % max(1, total // 10) == 0 else None)
    oracle_seconds = time.perf_counter() - started
    runs = {n: storage.read_json(f"{out}/actual-{n}.json") for n in plan.sets}
    predicted = _predictions(storage, settings, model_pointer["path"], plan)
    result = finite({
        "fingerprint": fingerprint, "order": list(plan.sets), "groups": config.groups, "length": length,
        "seed": config.seed,
        "base_loss": runs[causal.POOL]["base_loss"], "model": model_pointer["fingerprint"],
        "checkpoint_sha256": checkpoint_sha, "sets": {n: {
            "actual": runs[n]["actual"], "predicted": predicted[n],
            "context_ids": plan.group_context_ids(n)}
            for n in plan.sets},
        "summary": causal.summarize({n: runs[n]["actual"] for n in plan.sets}, predicted, seed=config.seed,
                                    references=[r for r in config.references if r in config.methods]),
    })
    info = storage.write_json(f"{out}/result.json", result)
    layout.write_pointer(storage, layout.CAUSAL_DIR, {"fingerprint": fingerprint, "path": f"{out}/result.json"})
    return dg.MaterializeResult(metadata=_metadata(result, len(pending), oracle_seconds, info.path))


def _predictions(storage: Storage, settings, model_path: str, plan: causal.GroupPlan) -> dict[str, list[float]]:
    """The final influence model's predicted group influence of every group (text decoded from the contexts as
    for the probe pool: GPT-NeoX tokens, special tokens dropped)."""
    neox = tk.load_tokenizer(settings.tokenize.tokenizer)
    texts = neox.decode_batch([row.tolist() for row in plan.tokens], skip_special_tokens=True)
    with im.local_model_dir(storage, model_path) as local:
        model = im.load_model(local, lm.default_device())
        encoder_tokenizer = im.load_tokenizer(local)
    return causal.predicted_by_set(model, encoder_tokenizer, texts, plan, settings.influence.max_tokens)


def _metadata(result: dict, computed_sets: int, seconds: float, path: str) -> dict:
    summary = result["summary"]
    table = causal.to_markdown(result)
    names = [n for n in summary["sets"] if n != summary["baseline"]]
    png = plots.intervals_png(
        {n: (summary["sets"][n]["minus_baseline"]["estimate"], summary["sets"][n]["minus_baseline"]["low"],
             summary["sets"][n]["minus_baseline"]["high"]) for n in names},
        "actual influence of groups minus random groups (negative = beneficial)", "change of the reference loss")
    groups = computed_sets * result["groups"]
    return {
        "dagster/row_count": sum(r["groups"] for r in summary["sets"].values()), "groups_per_set": result["groups"],
        "computed_groups": groups, "oracle_seconds": round(seconds, 1),
        "probes_per_hour": round(groups * result["length"] / seconds * 3600, 1) if groups and seconds > 0 else None,
        "base_reference_loss": result["base_loss"], "spearman_all": summary["spearman_all"],
        **{f"{n}_minus_random": summary["sets"][n]["minus_baseline"]["estimate"] for n in names},
        **{f"{n}_minus_{ref}": diff["estimate"] for n in names for ref, diff in summary["sets"][n]["minus"].items()},
        "table": dg.MetadataValue.md(table + "\n\n" + plots.png_markdown(png, "minus random groups")),
        "fingerprint": result["fingerprint"], "path": dg.MetadataValue.path(path),
    }
