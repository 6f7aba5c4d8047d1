"""The GPU figures of the scale work that had no script of their own, and the cost table at paper scale.

Run on a GPU machine with ``python -m bench.run --only gpu_checks`` (not part of the default set); on a CPU the
same code runs at tiny sizes, for correctness only (``BENCH_GPU_CHECKS_SIZE=tiny``, the default without CUDA).

1. **Pool inference, padding-free against padded.** The influence model around a BERT-base-size encoder (12
   layers, 768 hidden; random weights, as speed does not depend on them) with the paper's 4 x 512-token chunks, on
   documents cut from the Python documentation at lognormal lengths (median about 2,500 characters, the tail past
   the 2,048 tokens that 4 chunks hold): documents/s of ``embed`` in both layouts in the same process; the two
   layouts' embeddings must agree (cosine > 0.99 under bf16). Goal: padding-free at least 2x.
2. **Selection on the device.** 1M documents x 768 dimensions in clusters of about 3,000 (ratio 0.5):
   ``select_in_clusters`` on the device in float32, timed (goal under 10 s), against the CPU float64 path on the
   same data: the selected sets must be the same except at near-ties. Every cluster whose selection differs is
   checked: at its first differing step both picks are scored in float64 given the same prefix, and the gap must be
   below 1e-4 of the score (a near-tie float32 rounding can flip).
3. **The cost table.** The ``dclm-400m`` profile's work per stage in device-hours from the rates of this run
   (inference, selection) and of the oracle and pretraining benchmarks (``BENCH_ORACLE_PROBES_PER_HOUR``,
   ``BENCH_PRETRAIN_TOKENS_PER_SECOND``; defaults: the H100 figures in bench/README.md), as a share of one
   pretraining run, next to the paper's 17.1% of H100-hours at 400M-4x (goal: at most 5%).

The oracle replicas (``--only oracle_gpu``) and the 411m training step's MFU (``--only pretrain_gpu``) have their
own benchmarks; the ``gpu-demo`` profile's whole graph is timed with ``time GROUPMATES_PROFILE=gpu-demo make demo``.
Knobs: ``BENCH_GPU_CHECKS_SIZE`` (``full`` or ``tiny``), ``BENCH_INFERENCE_DOCS``, ``BENCH_SELECTION_DOCS``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.run import Figure
from groupmates_assets.lib import selection as sel
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.settings import METHOD, get_profile

PAPER_POOL = 29_478_616  # documents of the paper's 400M-4x pool (10,000 clusters of about 2,950)
PAPER_OVERHEAD = 0.171  # the paper's selection cost, as a share of the H100-hours of pretraining at 400M-4x
# Earlier H100 measurements (bench/README.md): the replica collector with 2 workers at 411m, and the 411m step.
README_PROBES_PER_HOUR, README_TOKENS_PER_SECOND = 13_992, 59_534


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    chunk_len: int
    chunks: int
    inference_docs: int
    selection_docs: int
    dim: int
    cluster: int


SIZES = {"full": Size("full", 768, 12, METHOD.encoder_chunk_tokens, METHOD.encoder_chunks, 2048, 1_000_000, 768,
                      3_000),
         "tiny": Size("tiny", 64, 2, 32, 4, 48, 20_000, 64, 300)}


def _say(message: str) -> None:
    print(f"[bench gpu_checks] {message}", file=sys.stderr, flush=True)


def _size() -> Size:
    default = "full" if torch.cuda.is_available() else "tiny"
    size = SIZES[os.environ.get("BENCH_GPU_CHECKS_SIZE", default)]
    return dataclasses.replace(
        size, inference_docs=int(os.environ.get("BENCH_INFERENCE_DOCS", size.inference_docs)),
        selection_docs=int(os.environ.get("BENCH_SELECTION_DOCS", size.selection_docs)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ inference


def _encoder(directory: str, size: Size) -> enc.EncoderSource:
    """A BERT-shaped encoder of ``size`` with random weights and the packaged MiniLM's tokenizer (BERT's vocab)."""
    from transformers import BertConfig, BertModel

    packaged = enc.resolve_encoder(None)
    config = BertConfig(vocab_size=enc.load_encoder_tokenizer(packaged).get_vocab_size(), hidden_size=size.hidden,
                        num_hidden_layers=size.layers, num_attention_heads=max(1, size.hidden // 64),
                        intermediate_size=4 * size.hidden, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    shutil.copy(os.path.join(packaged.location, "tokenizer.json"), os.path.join(directory, "tokenizer.json"))
    return enc.EncoderSource(directory, f"BERT-shaped, {size.layers} x {size.hidden} (random weights)", "bench")


def _texts(count: int, seed: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    lengths = np.clip(np.random.default_rng(seed).lognormal(np.log(2_500), 0.9, size=count), 200, 40_000)
    starts = np.random.default_rng(seed + 1).integers(0, len(text) - 40_000, size=count)
    return [text[s:s + int(n)] for s, n in zip(starts, lengths, strict=True)]


def inference(size: Size, device: torch.device) -> tuple[list[Figure], float]:
    """Documents/s of both layouts; returns the figures and the padding-free rate."""
    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as directory:
        source = _encoder(directory, size)
        tokenizer = enc.load_encoder_tokenizer(source)
        model = im.build_model(source, im.InfluenceModelConfig(chunk_len=size.chunk_len, chunks=size.chunks,
                                                               encoder_layers=None)).to(device).eval()
    docs = enc.chunk_documents(tokenizer, _texts(size.inference_docs), size.chunk_len, size.chunks)
    rows = np.arange(len(docs))
    rates, vectors = {}, {}
    max_tokens = get_profile("dclm-400m").influence.max_tokens
    for layout in ("trimmed", "padded", "trimmed"):  # the first pass warms up (CUDA kernels, allocator)
        _sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            vectors[layout] = model.embed(docs, rows, max_tokens=max_tokens, layout=layout).float().cpu()
        _sync(device)
        rates[layout] = len(docs) / (time.perf_counter() - started)
    cosine = torch.nn.functional.cosine_similarity(vectors["trimmed"], vectors["padded"], dim=-1)
    ratio = rates["trimmed"] / rates["padded"]
    chunks_used = len(docs.chunk_tokens) / (len(docs) * size.chunks)
    _say(f"inference: {rates['trimmed']:.1f} against {rates['padded']:.1f} documents/s, min cosine "
         f"{float(cosine.min()):.4f}")
    if float(cosine.min()) < 0.99:
        raise SystemExit(f"the two layouts' embeddings differ: min cosine {float(cosine.min()):.4f}")
    target = "PASS" if ratio >= 2 else "FAIL"
    return [
        Figure("gpu_checks: pool inference, padding-free", round(rates["trimmed"], 1), "documents/s",
               f"{source.name}, {size.chunks} x {size.chunk_len}-token chunks, {device.type}; {len(docs):,} documents, "
               f"{chunks_used:.0%} of the chunks hold text"),
        Figure("gpu_checks: pool inference, padded layout", round(rates["padded"], 1), "documents/s",
               f"padding-free is {ratio:.2f}x ({target if size.name == 'full' else 'tiny size: no target'}; "
               f"goal >= 2x); embeddings agree, min cosine {float(cosine.min()):.4f}"),
    ], rates["trimmed"]


# ------------------------------------------------------------------------------------------------ selection


def _near_tie(h: np.ndarray, u: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray, alpha: float,
              tau: float) -> tuple[bool, float]:
    """For one cluster's two selections (rows in pick order): scored in float64 at their first differing step
    given the same prefix, are the two picks a near-tie? Returns (near-tie, relative gap)."""
    step = int(np.flatnonzero(rows_a != rows_b)[0])
    prefix = rows_a[:step]
    mean = h[prefix].mean(axis=0) if step else None

    def score(row: int) -> float:
        return float(u[row]) if mean is None else float(alpha * u[row] * (1 - h[row] @ mean / tau))

    a, b = score(int(rows_a[step])), score(int(rows_b[step]))
    gap = abs(a - b) / max(abs(a), abs(b), 1e-12)
    return gap < 1e-4, gap


def selection(size: Size, device: torch.device) -> tuple[list[Figure], float]:
    """Device float32 against CPU float64; returns the figures and the device's documents/s."""
    rng = np.random.default_rng(0)
    n, clusters = size.selection_docs, max(1, size.selection_docs // size.cluster)
    h = rng.standard_normal((n, size.dim), dtype=np.float32)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    u = rng.normal(-0.01, 0.003, size=n).astype(np.float32)
    cluster = rng.integers(clusters, size=n)
    budgets = sel.cluster_budgets(np.bincount(cluster, minlength=clusters), METHOD.selection_ratio)
    warm = cluster < max(1, clusters // 20)
    sel.select_in_clusters(h[warm], u[warm], cluster[warm], budgets, 1.0, 1.0, device=device)
    _sync(device)
    started = time.perf_counter()
    fast = sel.select_in_clusters(h, u, cluster, budgets, 1.0, 1.0, device=device)
    _sync(device)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    exact = sel.select_in_clusters(h, u, cluster, budgets, 1.0, 1.0, device="cpu", dtype=torch.float64)
    cpu_seconds = time.perf_counter() - started
    differing, ties, worst = 0, 0, 0.0
    h64, u64 = h.astype(np.float64), u.astype(np.float64)
    for c in range(clusters):
        a, b = fast.rows[fast.cluster == c], exact.rows[exact.cluster == c]
        if not np.array_equal(a, b):
            differing += 1
            tie, gap = _near_tie(h64, u64, a, b, 1.0, 1.0)
            ties += tie
            worst = max(worst, gap)
    same = len(np.intersect1d(fast.rows, exact.rows)) / max(len(exact.rows), 1)
    _say(f"selection: {seconds:.2f} s on {device.type} against {cpu_seconds:.1f} s (CPU float64); {differing} "
         f"clusters differ, {ties} at a near-tie")
    if differing != ties:
        raise SystemExit(f"{differing - ties} clusters differ beyond a near-tie (largest gap {worst:.2e})")
    target = ("PASS" if seconds < 10 else "FAIL") if size.name == "full" and device.type == "cuda" else \
        "no target at this size or on a CPU"
    return [
        Figure("gpu_checks: selection on the device", round(seconds, 2), "s",
               f"{n:,} x {size.dim}-d, {clusters:,} clusters of ~{size.cluster:,}, ratio {METHOD.selection_ratio}, "
               f"float32 on {device.type}; {target} (goal < 10 s on one GPU)"),
        Figure("gpu_checks: selection, CPU float64 reference", round(cpu_seconds, 1), "s",
               f"same data; {same:.4%} of the documents shared; {differing} of {clusters:,} clusters differ, all at "
               f"near-ties (largest relative score gap at the first differing pick {worst:.1e})"),
    ], n / seconds


# --------------------------------------------------------------------------------------------- the cost table


def cost_table(inference_rate: float, selection_rate: float, projection: bool) -> list[Figure]:
    """Device-hours per stage of the dclm-400m profile at the given rates, against one pretraining run
    (``projection`` False: the rates are a tiny CPU run's, and the table only shows that the code runs)."""
    profile = get_profile("dclm-400m")
    probes_per_hour = float(os.environ.get("BENCH_ORACLE_PROBES_PER_HOUR", README_PROBES_PER_HOUR))
    tokens_per_second = float(os.environ.get("BENCH_PRETRAIN_TOKENS_PER_SECOND", README_TOKENS_PER_SECOND))
    seq_len = 2048
    trajectories = (profile.oracle.blocks * profile.oracle.trajectories_per_block
                    + 2 * profile.influence.bootstrap_per_tail)
    probes = trajectories * METHOD.trajectory_length
    training_docs = profile.influence.epochs * trajectories * METHOD.trajectory_length * 2  # two models
    hours = {
        "oracle": probes / probes_per_hour,
        "influence models (est.: 3x the inference cost per document)": training_docs * 3 / inference_rate / 3600,
        "pool inference (both models)": 2 * PAPER_POOL / inference_rate / 3600,
        "selection (clustering not measured)": PAPER_POOL / selection_rate / 3600,
    }
    pretraining = profile.lm.total_steps * profile.lm.batch_size * seq_len / tokens_per_second / 3600
    overhead = sum(hours.values()) / pretraining
    out = [Figure(f"cost: {stage}", round(value, 2), "device-hours", f"{value / pretraining:.2%} of pretraining")
           for stage, value in hours.items()]
    out.append(Figure("cost: pretraining, one 400M-4x run", round(pretraining, 1), "device-hours",
                      f"{profile.lm.total_steps:,} steps x {profile.lm.batch_size} x {seq_len} tokens at "
                      f"{tokens_per_second:,.0f} tokens/s per device"))
    out.append(Figure("cost: selection overhead", round(100 * overhead, 2), "% of pretraining",
                      (f"{'PASS' if overhead <= 0.05 else 'FAIL'} (goal <= 5%)" if projection else
                       "not a projection: inference and selection rates from a tiny CPU run")
                      + f"; paper: {PAPER_OVERHEAD:.1%}; oracle at {probes_per_hour:,.0f} probes/h, "
                      f"{trajectories:,} trajectories x {METHOD.trajectory_length}"))
    return out


def run(repeats: int = 1) -> list[Figure]:
    """Each check once (long enough to be stable on a GPU; at tiny size a correctness run)."""
    del repeats
    size = _size()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    inference_figures, inference_rate = inference(size, device)
    selection_figures, selection_rate = selection(size, device)
    setup = Figure("gpu_checks: setup", size.name, "", f"{device.type}"
                   + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "; correctness only"))
    projection = size.name == "full" and device.type == "cuda"
    return [setup, *inference_figures, *selection_figures, *cost_table(inference_rate, selection_rate, projection)]
