"""Target-LM pretraining throughput on one accelerator: tokens/s, MFU and peak memory of the real training step.

Run on a GPU machine with ``python -m bench.run --only pretrain_gpu`` (not part of the default set). It builds the
LM of the chosen shape with ``lm.build_model`` (fp32 weights, bf16 autocast on CUDA), runs ``lm.pretrain`` (the
step of every pretraining asset: CE + z-loss, grad clip, fused AdamW, one host sync per step for the logged loss)
for a few warm-up steps, then times the next steps between two ``torch.cuda.synchronize``. Tokens are random ids
already on the device, so data loading is left out.

MFU = model FLOPs per token x tokens/s / peak, with the PaLM count per trained token (forward + backward)
    6 N + 12 n_layers d_model seq_len
(N: non-embedding parameters; the second term is attention's QK^T and AV, counted in full although the causal
kernel skips the masked half), and a second figure that also counts the output head's matmul, + 6 vocab d_model,
which at 411M is a large share of the work. The peak defaults to 989 TFLOP/s, an H100 SXM's dense bf16.

Environment: ``BENCH_SHAPE`` (default 411m on CUDA, tiny elsewhere), ``BENCH_BATCH`` sequences per forward/backward
pass, a comma list to compare several (default 8 on CUDA, 2 elsewhere), ``BENCH_ACCUM`` passes per optimizer step
(default 1; > 1 measures ``train_step``'s gradient accumulation), ``BENCH_STEPS`` timed steps (default 10 on CUDA,
2 elsewhere), ``BENCH_WARMUP`` steps (default 3 on CUDA, 1 elsewhere), ``BENCH_PEAK_FLOPS`` (default 989e12).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from bench.run import Figure
from groupmates_assets.lib import lm

H100_SXM_BF16_DENSE = 989e12


def _settings() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "shape": os.environ.get("BENCH_SHAPE", "411m" if cuda else "tiny"),
        "batches": [int(b) for b in os.environ.get("BENCH_BATCH", "8" if cuda else "2").split(",")],
        "accum": int(os.environ.get("BENCH_ACCUM", "1")),
        "steps": int(os.environ.get("BENCH_STEPS", "10" if cuda else "2")),
        "warmup": int(os.environ.get("BENCH_WARMUP", "3" if cuda else "1")),
        "peak": float(os.environ.get("BENCH_PEAK_FLOPS", str(H100_SXM_BF16_DENSE))),
        "device": torch.device("cuda" if cuda else "cpu"),
    }


def flops_per_token(shape: lm.LMShape) -> tuple[float, float]:
    """(6 N + attention, the same + the output head's 6 vocab d_model) model FLOPs per trained token."""
    attention = 12 * shape.n_layers * shape.d_model * shape.seq_len
    dense = 6 * lm.param_count(shape, embeddings=False) + attention
    return dense, dense + 6 * shape.vocab_size * shape.d_model


def _batches(shape: lm.LMShape, rows: int, device: torch.device, count: int = 2) -> list[torch.Tensor]:
    """A few [rows, seq_len + 1] batches of random ids, drawn on the CPU (a CPU generator cannot sample on CUDA)
    and staged on the device once."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape.vocab_size, (rows, shape.seq_len + 1), generator=generator).to(device)
            for _ in range(count)]


def _cycle(batches: list[torch.Tensor], count: int):
    return (batches[i % len(batches)] for i in range(count))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model, optimizer, cfg: lm.OptimConfig, shape: lm.LMShape, micro: int, s: dict,
             repeats: int) -> dict:
    """Best-of-``repeats`` seconds per step at ``micro`` sequences per pass, and the peak memory of those steps."""
    device, rows = s["device"], micro * s["accum"]
    batches = _batches(shape, rows, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    curve = lm.pretrain(model, optimizer, _cycle(batches, s["warmup"]), cfg, start_step=step, steps=s["warmup"],
                        micro_batch=micro)
    step += s["warmup"]
    best = float("inf")
    for _ in range(max(1, repeats)):
        _sync(device)
        started = time.perf_counter()
        curve = lm.pretrain(model, optimizer, _cycle(batches, s["steps"]), cfg, start_step=step, steps=s["steps"],
                            micro_batch=micro)
        _sync(device)
        best = min(best, (time.perf_counter() - started) / s["steps"])
        step += s["steps"]
    out = {"seconds_per_step": best, "tokens_per_step": rows * shape.seq_len, "loss": curve[-1]["loss"]}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    return out


def run(repeats: int = 1) -> list[Figure]:
    s = _settings()
    device, shape = s["device"], lm.get_shape(s["shape"])
    dense, with_head = flops_per_token(shape)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    total_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    started = time.perf_counter()
    model = lm.build_model(shape, seed=0, device=device)
    cfg = lm.OptimConfig(warmup_steps=100, total_steps=10_000)
    optimizer = lm.make_optimizer(model, cfg)
    build_seconds = time.perf_counter() - started
    figures = [Figure(
        "pretrain_gpu: setup", s["shape"], "",
        f"{lm.param_count(shape):,} parameters ({lm.param_count(shape, embeddings=False):,} non-embedding) on "
        f"{name}; fp32 weights, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, fused AdamW; "
        f"{shape.seq_len} tokens per sequence, {s['accum']} pass(es) per step; {s['warmup']} warm-up + "
        f"{s['steps']} timed steps; torch {torch.__version__}; model built in {build_seconds:.1f} s")]
    for micro in s["batches"]:
        label = f"{micro} x {shape.seq_len}" + (f" x {s['accum']} passes" if s["accum"] > 1 else "")
        try:
            m = _measure(model, optimizer, cfg, shape, micro, s, repeats)
        except torch.OutOfMemoryError as error:
            m = {"oom": str(error).splitlines()[0][:200]}
        if "oom" in m:  # outside the except block, so the traceback's activations are already freed
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[bench] pretrain_gpu: {label}: out of memory", file=sys.stderr)
            figures.append(Figure(f"pretrain_gpu: {label}", "OOM", "", m["oom"]))
            continue
        rate = m["tokens_per_step"] / m["seconds_per_step"]
        mfu, mfu_head = dense * rate / s["peak"], with_head * rate / s["peak"]
        print(f"[bench] pretrain_gpu: {label}: {rate:,.0f} tokens/s, MFU {mfu:.1%} ({mfu_head:.1%} with the head)",
              file=sys.stderr)
        figures += [
            Figure(f"pretrain_gpu: throughput ({label})", round(rate), "tokens/s",
                   f"{m['seconds_per_step']:.3f} s per step (best of {max(1, repeats)}); loss {m['loss']:.3f}"),
            Figure(f"pretrain_gpu: MFU ({label})", round(100 * mfu, 2), "%",
                   f"6N + 12 n_layers d_model seq_len = {dense / 1e9:.3f} GFLOP/token; peak "
                   f"{s['peak'] / 1e12:.0f} TFLOP/s (BENCH_PEAK_FLOPS)"),
            Figure(f"pretrain_gpu: MFU incl. output head ({label})", round(100 * mfu_head, 2), "%",
                   f"+ 6 vocab d_model = {with_head / 1e9:.3f} GFLOP/token"),
        ]
        if "peak_allocated" in m:
            figures.append(Figure(f"pretrain_gpu: peak GPU memory ({label})", round(m["peak_allocated"] / 2**30, 2),
                                  "GiB", f"max allocated; {m['peak_reserved'] / 2**30:.2f} GiB reserved of "
                                  f"{total_memory / 2**30:.1f} GiB"))
    return figures
