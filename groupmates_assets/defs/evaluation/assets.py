"""Evaluation stage: each method's pretrained LM on offline multiple-choice tasks and held-out text."""

import io
import json
import time

import dagster as dg
import numpy as np
import torch
import zstandard

from groupmates_assets.defs.common import finite
from groupmates_assets.defs.partitions import selection_methods
from groupmates_assets.defs.pretrain.assets import PRETRAIN_DIR, load_checkpoint_from, pretrain_checkpoints
from groupmates_assets.defs.resources import EMBEDDED_POOL_DIR, PlatformResource
from groupmates_assets.lib import evaluation as ev
from groupmates_assets.lib import lm
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import EvalProfile

EVALUATION_DIR = "evaluation"
DEFAULT_HELDOUT = f"{EMBEDDED_POOL_DIR}/positives/wikipedia-summaries-hq.jsonl.zst"


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


@dg.asset(
    partitions_def=selection_methods,
    group_name="evaluation",
    code_version="evaluation-v1",
    deps=[pretrain_checkpoints],
    kinds={"pytorch"},
    description="The final checkpoint trained on one method's corpus, zero-shot on offline multiple-choice tasks "
    "(rank classification by per-token log-likelihood; DCLM-core-style centered accuracy (acc - random) / "
    "(1 - random), averaged) and on held-out text (loss, bits per byte).",
)
def evaluation(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings()
    method, eval_settings = context.partition_key, settings.evaluation
    torch.set_num_threads(settings.lm.torch_threads)
    current_path = f"{PRETRAIN_DIR}/{method}/current.json"
    if not storage.exists(current_path):
        raise dg.Failure(f"no pretrained checkpoint for {method}; materialize pretrain_checkpoints first")
    current = storage.read_json(current_path)
    device = lm.default_device()
    model, _, state = load_checkpoint_from(storage, current["final"], device)
    model.eval()
    tokenizer = tk.load_tokenizer(settings.tokenize.tokenizer)
    started = time.perf_counter()
    result = ev.evaluate_tasks(model, tokenizer, list(eval_settings.tasks) if eval_settings.tasks else None,
                               limit_per_task=eval_settings.limit_per_task, seed=eval_settings.seed, device=device)
    texts, heldout = heldout_texts(storage, eval_settings)
    loss, bpb = ev.bits_per_byte(model, tokenizer, texts, device=device) if texts else (None, None)
    seconds = time.perf_counter() - started
    report = {"method": method, "checkpoint": current["final"], "step": state["step"],
              "tokens_seen": state["extra"].get("tokens_seen"), **result.to_dict(),
              "heldout": {"path": heldout, "documents": len(texts), "loss": loss, "bits_per_byte": bpb}}
    info = storage.write_json(f"{EVALUATION_DIR}/{method}.json", finite(report))
    context.log.info(f"{method}: core centered accuracy {result.core_centered:.4f}"
                     + (f", held-out bits per byte {bpb:.4f}" if bpb is not None else ""))
    return dg.MaterializeResult(metadata={
        "core_centered": finite(float(result.core_centered)), "bits_per_byte": finite(bpb),
        "heldout_loss": finite(loss), "heldout_documents": len(texts),
        "tasks": dg.MetadataValue.md(result.to_markdown()), "step": state["step"],
        "tokens_seen": state["extra"].get("tokens_seen"), "seconds": round(seconds, 1), "device": str(device),
        "path": dg.MetadataValue.path(info.path),
    })
