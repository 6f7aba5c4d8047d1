"""Small plots for asset metadata: PNG bytes plus a markdown embedding the Dagster UI renders inline."""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Sequence


def histogram_png(bin_edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str,
                  threshold: float | None = None) -> bytes:
    """A bar histogram from precomputed bins (so shards can be merged without the raw scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    widths = [b - a for a, b in itertools.pairwise(bin_edges)]
    ax.bar(bin_edges[:-1], counts, width=widths, align="edge", color="#4f6bed", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#d1495b", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend(loc="upper center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("documents", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def histogram_table(bin_edges: Sequence[float], counts: Sequence[int]) -> str:
    """The same histogram as a markdown table with text bars, for logs and plain viewers."""
    peak = max(counts) if counts and max(counts) > 0 else 1
    rows = ["| score | documents | |", "|---|---:|---|"]
    for lo, hi, count in zip(bin_edges[:-1], bin_edges[1:], counts, strict=True):
        rows.append(f"| {lo:.2f}-{hi:.2f} | {count} | {'█' * round(20 * count / peak)} |")
    return "\n".join(rows)


def line_png(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    """A simple line chart (loss curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.plot(xs, ys, color="#4f6bed", linewidth=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
