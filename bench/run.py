"""Run the benchmarks, print one markdown table of figures and write them as JSON.

Speed is measured here, never in timed tests: a shared machine makes wall-clock assertions flaky, whereas
best-of-N figures from one pinned core can be compared across commits by a person.

Usage: ``python -m bench.run [--only filter] [--out bench/results/latest.json] [--repeats 3]``.
Only the standard library is imported at module level, so the process can be pinned to one core before
numpy, fastText or Arrow start (and size) their thread pools.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# name -> (module exposing ``run(repeats: int) -> list[Figure]``, cores it measures on). Each benchmark runs in
# its own process; one-core benchmarks are pinned before the module (and numpy, torch, ...) is imported.
BENCHMARKS: dict[str, tuple[str, int]] = {
    "filter": ("bench.bench_filter", 1),
    "tokenize": ("bench.bench_tokenize", 2),
    "oracle": ("bench.bench_oracle", 2),
    "oracle_gpu": ("bench.bench_oracle_gpu", 2),
    "pretrain_gpu": ("bench.bench_pretrain_gpu", 2),
    "s3": ("bench.bench_s3", 2),
    "partitions": ("bench.bench_partitions", 1),
    "asset_pages": ("bench.bench_asset_pages", 1),
    "postgres_runs": ("bench.bench_postgres_runs", 2),
    "influence": ("bench.bench_influence", 2),
    "selection": ("bench.bench_selection", 2),
    "scale": ("bench.bench_scale", 2),
    "centroid_search": ("bench.bench_centroid_search", 2),
    "gpu_checks": ("bench.bench_gpu_checks", 2),
    "deploy": ("bench.bench_deploy", 2),
}
# Run only with --only: the accelerator benchmarks, the scale benchmark (about an hour, 2M documents), the
# centroid-search comparison (a few minutes, it backs a design choice) and the deployment benchmark (the compose
# stack against the demo, about 30 min).
ON_REQUEST = {"oracle_gpu", "pretrain_gpu", "gpu_checks", "scale", "centroid_search", "deploy"}
DEFAULT_OUT = "bench/results/latest.json"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
HEAVY_MODULES = ("numpy", "pyarrow", "fasttext", "zstandard", "orjson", "torch")
_ALLOWED_AT_START = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
_pin_note: str | None = None


@dataclass(frozen=True)
class Figure:
    """One row of the table: what was measured, its value and unit, and how to read it."""

    name: str
    value: float | int | str
    unit: str
    notes: str = ""


def pin_to_one_core() -> str:
    """Restrict this process to its first allowed CPU and one BLAS/OpenMP thread; returns a note saying so.

    Idempotent. The note warns when a heavy library was imported first, since its thread pool may then
    already run on other cores.
    """
    global _pin_note
    if _pin_note is not None:
        return _pin_note
    for var in THREAD_VARS:
        os.environ[var] = "1"
    late = [name for name in HEAVY_MODULES if name in sys.modules]
    if hasattr(os, "sched_setaffinity") and _ALLOWED_AT_START:
        cpu = _ALLOWED_AT_START[0]
        os.sched_setaffinity(0, {cpu})
        note = f"pinned to CPU {cpu} (of {len(_ALLOWED_AT_START)} allowed) with sched_setaffinity"
    else:
        note = "not pinned (no sched_setaffinity on this platform)"
    note += "; OMP/MKL/OPENBLAS_NUM_THREADS=1"
    if late:
        note += f" (set after importing {', '.join(late)})"
    _pin_note = note
    return note


def machine() -> dict[str, Any]:
    """What the figures were measured on; they mean little without it."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpus_allowed": len(_ALLOWED_AT_START) or os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def format_value(value: float | int | str) -> str:
    """Thousands separators for counts, three significant figures (or more for big numbers) for rates."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(figures: Sequence[Figure]) -> str:
    """One markdown table: pasteable into an issue or a PR."""
    rows = ["| name | value | unit | notes |", "|---|---:|---|---|"]
    for fig in figures:
        notes = fig.notes.replace("|", "\\|")
        rows.append(f"| {fig.name} | {format_value(fig.value)} | {fig.unit} | {notes} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                        help="run only this benchmark (repeatable); default: all")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output path (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per figure; the best is kept")
    parser.add_argument("--child", choices=sorted(BENCHMARKS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _run_child(args.child, args.repeats)
    results: dict[str, list[Figure]] = {}
    for name in args.only or sorted(set(BENCHMARKS) - ON_REQUEST):
        results[name] = _run_in_subprocess(name, args.repeats)
    print(markdown_table([fig for figs in results.values() for fig in figs]))
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": args.repeats,
        "benchmarks": {name: [asdict(fig) for fig in figs] for name, figs in results.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0


def _run_child(name: str, repeats: int) -> int:
    """Inside the benchmark's own process: pin if it is a one-core benchmark, run it, print figures as JSON."""
    module_name, cores = BENCHMARKS[name]
    if cores == 1:
        print(f"[bench] {name}: {pin_to_one_core()}", file=sys.stderr)  # before numpy/fastText/Arrow start
    else:
        print(f"[bench] {name}: {len(_ALLOWED_AT_START) or os.cpu_count()} cores, not pinned", file=sys.stderr)
    figures = importlib.import_module(module_name).run(repeats=repeats)
    print(json.dumps([asdict(fig) for fig in figures]))
    return 0


def _run_in_subprocess(name: str, repeats: int) -> list[Figure]:
    """A fresh interpreter per benchmark: its pinning and thread pools do not leak into the next one."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "bench.run", "--child", name, "--repeats", str(repeats)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark {name!r} failed (exit {done.returncode})")
    return [Figure(**fig) for fig in json.loads(done.stdout.strip().splitlines()[-1])]


if __name__ == "__main__":
    # Delegate to the importable ``bench.run``, not this ``__main__`` copy, so benchmark modules that import
    # ``bench.run`` share one pinning state (and see the CPUs allowed before pinning).
    from bench import run as canonical

    sys.exit(canonical.main())
