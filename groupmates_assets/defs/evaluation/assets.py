"""Evaluation stage: each method's pretrained LM on offline multiple-choice tasks and held-out text."""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import torch

from groupmates_assets.defs.common import PermanentFailure, missing_is_permanent
from groupmates_assets.defs.deployment import gpu_asset
from groupmates_assets.defs.partitions import selection_methods
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import current_shard_keys
from groupmates_assets.lib import evaluation as ev
from groupmates_assets.lib import heldout as heldout_lib
from groupmates_assets.lib import icl_tasks as icl
from groupmates_assets.lib import layout, lm
from groupmates_assets.lib import report as rp
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.jsonsafe import finite
from groupmates_assets.lib.pretraining import load_weights_from
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import METHOD, EvalProfile

# What a stored point holds; part of the cache fingerprint, so points of an older layout are recomputed.
POINT_VERSION = "evaluation-v4"  # v4: per-item scores, the pool's held-out slice with doc ids and sources


def load_icl_tasks(storage: Storage, eval_settings: EvalProfile) -> list[icl.IclTaskData]:
    """The user's task files, checked line by line before any checkpoint is evaluated (a bad file fails the run
    permanently, naming file, line and field)."""
    try:
        return [icl.load_icl_task(config, storage) for config in eval_settings.icl_tasks]
    except icl.IclTaskError as error:
        raise PermanentFailure(str(error)) from None


def evaluate_checkpoint(storage: Storage, checkpoint: str, eval_settings: EvalProfile, tokenizer,
                        heldout: list[heldout_lib.HeldoutDoc], device,
                        icl_tasks: list[icl.IclTaskData] | None = None) -> dict[str, Any]:
    """Tasks (built-in and the user's files) and held-out text for one stored checkpoint; per-document losses keep
    each document's id and source (per-source bits per byte, paired comparisons between methods)."""
    texts = [doc.text for doc in heldout]
    model, state = load_weights_from(storage, checkpoint, device)
    model.eval()
    batch_tokens = 65_536 if torch.device(device).type == "cuda" else 4096  # tokens per forward pass
    result = icl.evaluate_all(model, tokenizer, list(eval_settings.tasks) if eval_settings.tasks else None,
                              icl_tasks or [], limit_per_task=eval_settings.limit_per_task, seed=eval_settings.seed,
                              num_fewshot=eval_settings.num_fewshot, device=device, max_tokens_per_batch=batch_tokens)
    losses = ev.document_losses(model, tokenizer, texts, device=device, max_tokens_per_batch=batch_tokens) \
        if texts else None
    return {"checkpoint": checkpoint, "step": state["step"], "tokens_seen": state["extra"].get("tokens_seen"),
            **result.to_dict(), "heldout_loss": losses.loss if losses else None,
            "bits_per_byte": losses.bits_per_byte if losses else None,
            "heldout_documents": {**dataclasses.asdict(losses), "doc_id": [d.doc_id for d in heldout],
                                  "source": [d.source for d in heldout]} if losses else None,
            "tasks_markdown": result.to_markdown()}


@gpu_asset(
    partitioned=True,
    partitions_def=selection_methods,
    group_name="evaluation",
    code_version=POINT_VERSION,
    deps=["pretrain_checkpoints"],
    kinds={"pytorch"},
)
def evaluation(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Every checkpoint of every seed trained on one method's corpus (or only the last, with evaluation.every_checkpoint
    off), on offline multiple-choice tasks with DCLM's shots per task (or evaluation.num_fewshot) and on the user's
    ICL task files (rank classification by per-token log-likelihood; greedy accuracy for language modeling; DCLM-core-
    style centered accuracy (acc - random) / (1 - random) with DCLM's random baselines, and with 1/num_choices beside
    it, averaged) and on held-out text (loss, bits per byte); mean, sample standard deviation and t interval over
    seeds at the final step, and the paired difference from random with its interval when random's evaluation with
    the same settings is stored. Held-out text is a seeded sample, stratified by source, of the pool's held-out
    slice (never filtered, selected nor trained on) or of the user's evaluation.heldout_path; bits per byte is
    reported per source and pooled. Evaluated checkpoints are kept, so a rerun only evaluates new ones."""
    storage, settings = platform.storage(), platform.settings()
    method, eval_settings = context.partition_key, settings.evaluation
    torch.set_num_threads(settings.lm.torch_threads)
    with missing_is_permanent():
        current = layout.current_pretrain(storage, method)
    device = lm.default_device()
    tokenizer = tk.load_tokenizer(settings.tokenize.tokenizer)
    docs, heldout = _heldout_set(context, platform, eval_settings)
    icl_tasks = load_icl_tasks(storage, eval_settings)
    eval_fp = layout.fingerprint(version=POINT_VERSION, settings=dataclasses.asdict(eval_settings),
                                 heldout=heldout["sample_sha"], icl_sha={task.name: task.sha256 for task in icl_tasks})
    started = time.perf_counter()
    runs, evaluated = _evaluated_runs(
        context, storage, current["runs"], f"{layout.EVALUATION_DIR}/{method}/{eval_fp}",
        eval_settings.every_checkpoint,
        lambda checkpoint: evaluate_checkpoint(storage, checkpoint, eval_settings, tokenizer, docs, device, icl_tasks))
    report = ev.method_report(method, current, eval_fp, heldout, runs)
    info = storage.write_json(f"{layout.EVALUATION_DIR}/{method}.json", finite(report))
    final = report["final"]
    spread = final["core_centered"]["std"]
    context.log.info(f"{method}: core centered accuracy {final['core_centered']['mean']:.4f} "
                     + (f"(sd {spread:.4f} over {len(runs)} seeds)" if spread is not None else "(one seed)"))
    return dg.MaterializeResult(metadata={
        "core_centered": finite(final["core_centered"]["mean"]),
        "core_centered_std": finite(final["core_centered"]["std"]),
        "core_centered_uniform": finite(final["core_centered_uniform"]["mean"]),
        **_seed_interval_metadata(final), **_vs_random(storage, method, report),
        "bits_per_byte": finite(final["bits_per_byte"]["mean"]),
        "bits_per_byte_std": finite(final["bits_per_byte"]["std"]),
        "heldout_loss": finite(final["heldout_loss"]["mean"]), "heldout_documents": len(docs),
        "heldout_source": heldout["path"] or "pool held-out slice",
        "bits_per_byte_by_source": dg.MetadataValue.md(ev.bits_per_byte_table(
            {s: v["mean"] for s, v in final["bits_per_byte_by_source"].items() if v["mean"] is not None},
            heldout["by_source"]) + f"\n\n(mean over {len(runs)} seed(s), final step)"),
        "seeds": len(runs), "checkpoints_evaluated_now": evaluated,
        "tasks": dg.MetadataValue.md(runs[0]["points"][-1]["tasks_markdown"]
                                     + f"\n\n(seed {runs[0]['seed']}, final step)"),
        "step": final["step"], "tokens_seen": final["tokens_seen"],
        "seconds": round(time.perf_counter() - started, 1), "device": str(device),
        "path": dg.MetadataValue.path(info.path),
    })


def _seed_interval_metadata(final: dict[str, Any]) -> dict[str, float | None]:
    """The Student t interval over seeds of the final core and bits-per-byte figures (two or more seeds)."""
    out = {}
    for metric in ("core_centered", "bits_per_byte"):
        interval = final[metric]["interval"]
        if interval is not None:
            out[f"{metric}_t_low"], out[f"{metric}_t_high"] = finite(interval["low"]), finite(interval["high"])
    return out


def _vs_random(storage: Storage, method: str, report: dict[str, Any]) -> dict[str, Any]:
    """The final paired difference from random with its intervals and verdict, when random's evaluation with the same
    evaluation settings is already stored (the report computes it for every method in any case)."""
    path = f"{layout.EVALUATION_DIR}/random.json"
    if method == "random" or not storage.exists(path):
        return {}
    comparison = rp.final_difference(report, storage.read_json(path), (method, "random"), METHOD.intervals())
    if comparison is None:
        return {}
    lines = [line for metric in rp.HIGHER_IS_BETTER
             if (line := rp.verdict_line(method, "random", comparison, metric)) is not None]
    return {**{k: finite(v) for k, v in rp.difference_metadata(method, "random", comparison).items()},
            "verdict_vs_random": dg.MetadataValue.md("\n".join(f"- {line}" for line in lines))}


def _heldout_set(context: dg.AssetExecutionContext, platform: PlatformResource,
                 eval_settings: EvalProfile) -> tuple[list[heldout_lib.HeldoutDoc], dict[str, Any]]:
    """The sampled held-out documents and their description: path (None: the pool's slice), documents per source,
    and a hash of the sampled doc ids (part of the cache fingerprint)."""
    storage, settings = platform.storage(), platform.settings()
    if eval_settings.heldout_path:
        try:
            available = heldout_lib.user_heldout(storage, eval_settings.heldout_path, settings.pool.group_field,
                                                 platform.fs_options)
        except (ValueError, shard_io.ShardReadError) as exc:
            raise PermanentFailure(str(exc)) from None
    else:
        available = heldout_lib.pool_heldout(storage, current_shard_keys(context.instance, platform))
    if not available:
        context.log.warning("no held-out documents (pool.heldout_fraction 0 and no evaluation.heldout_path?): "
                            "bits per byte is not measured")
    docs = heldout_lib.stratified_sample(available, eval_settings.heldout_documents, eval_settings.seed,
                                         eval_settings.heldout_min_per_source)
    by_source: dict[str, int] = {}
    for doc in docs:
        by_source[doc.source] = by_source.get(doc.source, 0) + 1
    return docs, {"path": eval_settings.heldout_path, "documents": len(docs), "available": len(available),
                  "by_source": by_source, "sample_sha": heldout_lib.sample_fingerprint(docs)}


def _evaluated_runs(context: dg.AssetExecutionContext, storage: Storage, runs: list[dict[str, Any]], cache_dir: str,
                    every_checkpoint: bool,
                    evaluate: Callable[[str], dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Each run's evaluated checkpoints (or only its last) as [{"seed", "points"}], and how many were evaluated now:
    a point is stored once under ``cache_dir`` and read back, so a rerun only evaluates new checkpoints."""
    evaluated_runs, evaluated = [], 0
    for run in runs:
        points = []
        for step in run["checkpoints"] if every_checkpoint else run["checkpoints"][-1:]:
            cached = f"{cache_dir}/{run['path'].rsplit('/', 2)[-2]}/seed-{run['seed']}/step-{step:06d}.json"
            if not storage.exists(cached):
                point = evaluate(f"{run['path']}/step-{step:06d}")
                storage.write_json(cached, finite(point))
                evaluated += 1
                context.log.info(f"{context.partition_key} seed {run['seed']} step {step}: core centered "
                                 f"{point['core_centered']:.4f}, bits per byte {point['bits_per_byte']}")
            points.append(storage.read_json(cached))
        evaluated_runs.append({"seed": run["seed"], "points": points})
    return evaluated_runs, evaluated
