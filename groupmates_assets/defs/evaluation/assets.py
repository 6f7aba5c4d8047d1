"""Evaluation stage: each method's pretrained LM on offline multiple-choice tasks and held-out text."""

import dataclasses
import io
import json
import time
from typing import Any

import dagster as dg
import numpy as np
import torch
import zstandard

from groupmates_assets.defs.common import finite, missing_is_permanent
from groupmates_assets.defs.deployment import gpu_asset_args, on_leased_gpu
from groupmates_assets.defs.partitions import selection_methods
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import evaluation as ev
from groupmates_assets.lib import layout, lm
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.pretraining import load_weights_from
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import EvalProfile

DEFAULT_HELDOUT = layout.EMBEDDED_POSITIVES  # never in the pool, so in no selection


def heldout_texts(storage: Storage, settings: EvalProfile) -> tuple[list[str], str | None]:
    """A seeded sample of held-out documents (never in the pool, so in no selection); empty if none exist."""
    path = settings.heldout_path or DEFAULT_HELDOUT
    if not storage.exists(path):
        return [], None
    data = storage.read_bytes(path)
    if path.endswith((".zst", ".zstd")):
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    texts = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{storage.url(path)}, line {number}: not a JSON record with a text field "
                             f"({exc})") from exc
    rng = np.random.default_rng(settings.seed)
    chosen = sorted(rng.choice(len(texts), size=min(settings.heldout_documents, len(texts)), replace=False))
    return [texts[i] for i in chosen], path


def _summary(values: list[float | None]) -> dict[str, Any]:
    """Mean and (population) standard deviation over seeds, with the values; None where nothing is finite."""
    finite_values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not finite_values:
        return {"mean": None, "std": None, "values": values}
    return {"mean": float(np.mean(finite_values)), "std": float(np.std(finite_values)), "values": values}


def evaluate_checkpoint(storage: Storage, checkpoint: str, eval_settings: EvalProfile, tokenizer, texts: list[str],
                        device) -> dict[str, Any]:
    """Tasks and held-out text for one stored checkpoint."""
    model, state = load_weights_from(storage, checkpoint, device)
    model.eval()
    batch_tokens = 65_536 if torch.device(device).type == "cuda" else 4096  # tokens per forward pass
    result = ev.evaluate_tasks(model, tokenizer, list(eval_settings.tasks) if eval_settings.tasks else None,
                               limit_per_task=eval_settings.limit_per_task, seed=eval_settings.seed, device=device,
                               max_tokens_per_batch=batch_tokens)
    loss, bpb = ev.bits_per_byte(model, tokenizer, texts, device=device, max_tokens_per_batch=batch_tokens) \
        if texts else (None, None)
    return {"checkpoint": checkpoint, "step": state["step"], "tokens_seen": state["extra"].get("tokens_seen"),
            **result.to_dict(), "heldout_loss": loss, "bits_per_byte": bpb,
            "tasks_markdown": result.to_markdown()}


@dg.asset(
    partitions_def=selection_methods,
    group_name="evaluation",
    code_version="evaluation-v2",
    deps=["pretrain_checkpoints"],
    kinds={"pytorch"},
    description="Every checkpoint of every seed trained on one method's corpus (or only the last, with "
    "evaluation.every_checkpoint off), zero-shot on offline multiple-choice tasks (rank classification by "
    "per-token log-likelihood; DCLM-core-style centered accuracy (acc - random) / (1 - random), averaged) and on "
    "held-out text (loss, bits per byte); mean and spread over seeds at the final step. Evaluated checkpoints "
    "are kept, so a rerun only evaluates new ones.",
    **gpu_asset_args(partitioned=True),
)
@on_leased_gpu
def evaluation(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings()
    method, eval_settings = context.partition_key, settings.evaluation
    torch.set_num_threads(settings.lm.torch_threads)
    with missing_is_permanent():
        current = layout.current_pretrain(storage, method)
    device = lm.default_device()
    tokenizer = tk.load_tokenizer(settings.tokenize.tokenizer)
    texts, heldout = heldout_texts(storage, eval_settings)
    eval_fp = layout.fingerprint(settings=dataclasses.asdict(eval_settings), heldout=heldout,
                          heldout_sha=storage.info(heldout).sha256 if heldout else None)
    started, runs, evaluated = time.perf_counter(), [], 0
    for run in current["runs"]:
        steps = run["checkpoints"] if eval_settings.every_checkpoint else run["checkpoints"][-1:]
        points = []
        for step in steps:
            cached = f"{layout.EVALUATION_DIR}/{method}/{eval_fp}/{run['path'].rsplit('/', 2)[-2]}/" \
                     f"seed-{run['seed']}/step-{step:06d}.json"
            if not storage.exists(cached):
                point = evaluate_checkpoint(storage, f"{run['path']}/step-{step:06d}", eval_settings, tokenizer, texts,
                                            device)
                storage.write_json(cached, finite(point))
                evaluated += 1
                context.log.info(f"{method} seed {run['seed']} step {step}: core centered "
                                 f"{point['core_centered']:.4f}, bits per byte {point['bits_per_byte']}")
            points.append(storage.read_json(cached))
        runs.append({"seed": run["seed"], "points": points})
    finals = [r["points"][-1] for r in runs]
    tasks = sorted(finals[0]["tasks"])
    report = {"method": method, "pretrain_fingerprint": current["fingerprint"], "evaluation_fingerprint": eval_fp,
              "stages": current.get("stages"), "heldout": {"path": heldout, "documents": len(texts)},
              "final": {"step": finals[0]["step"], "tokens_seen": finals[0]["tokens_seen"],
                        "core_centered": _summary([p["core_centered"] for p in finals]),
                        "bits_per_byte": _summary([p["bits_per_byte"] for p in finals]),
                        "heldout_loss": _summary([p["heldout_loss"] for p in finals]),
                        "tasks": {t: _summary([p["tasks"][t]["centered"] for p in finals]) for t in tasks}},
              "runs": [{"seed": r["seed"], "points": [{k: p[k] for k in ("step", "tokens_seen", "core_centered",
                                                                          "bits_per_byte", "heldout_loss")}
                                                      for p in r["points"]]} for r in runs]}
    info = storage.write_json(f"{layout.EVALUATION_DIR}/{method}.json", finite(report))
    final = report["final"]
    context.log.info(f"{method}: core centered accuracy {final['core_centered']['mean']:.4f} "
                     f"(± {final['core_centered']['std']:.4f} over {len(runs)} seed(s))")
    return dg.MaterializeResult(metadata={
        "core_centered": finite(final["core_centered"]["mean"]),
        "core_centered_std": finite(final["core_centered"]["std"]),
        "bits_per_byte": finite(final["bits_per_byte"]["mean"]),
        "bits_per_byte_std": finite(final["bits_per_byte"]["std"]),
        "heldout_loss": finite(final["heldout_loss"]["mean"]), "heldout_documents": len(texts),
        "seeds": len(runs), "checkpoints_evaluated_now": evaluated,
        "tasks": dg.MetadataValue.md(finals[0]["tasks_markdown"] + f"\n\n(seed {runs[0]['seed']}, final step)"),
        "step": final["step"], "tokens_seen": final["tokens_seen"],
        "seconds": round(time.perf_counter() - started, 1), "device": str(device),
        "path": dg.MetadataValue.path(info.path),
    })
