"""Small plots for asset metadata: PNG bytes plus a markdown embedding the Dagster UI renders inline."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

BLUE, RED = "#4f6bed", "#d1495b"


@contextlib.contextmanager
def _figure(title: str, xlabel: str, ylabel: str, out: list[bytes]) -> Iterator[Any]:
    """A small labelled axes; on exit the figure is rendered to PNG bytes (appended to ``out``) and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    try:
        yield ax
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        out.append(buffer.getvalue())
    finally:
        plt.close(fig)


def histogram_png(bin_edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str,
                  threshold: float | None = None, ylabel: str = "documents") -> bytes:
    """A bar histogram from precomputed bins (so shards can be merged without the raw values)."""
    out: list[bytes] = []
    with _figure(title, xlabel, ylabel, out) as ax:
        widths = [b - a for a, b in itertools.pairwise(bin_edges)]
        ax.bar(bin_edges[:-1], counts, width=widths, align="edge", color=BLUE, edgecolor="white")
        if threshold is not None:
            ax.axvline(threshold, color=RED, linestyle="--", label=f"threshold {threshold:.4g}")
            ax.legend(loc="upper center", fontsize=8)
    return out[0]


def line_png(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str) -> bytes:
    """A simple line chart (loss curves)."""
    out: list[bytes] = []
    with _figure(title, xlabel, ylabel, out) as ax:
        ax.plot(xs, ys, color=BLUE, linewidth=1.2)
        ax.grid(alpha=0.3)
    return out[0]


PALETTE = (BLUE, RED, "#2e933c", "#f4a259", "#7b2cbf", "#555555")


def lines_png(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str,
              bands: dict[str, Sequence[float]] | None = None, hline: tuple[float, str] | None = None,
              ranges: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> bytes:
    """Several labelled lines on one axes (one per method or seed); ``bands`` adds a +-spread around a line,
    ``ranges`` a (lows, highs) band (an interval need not be symmetric); ``hline`` draws a dashed reference level
    with its label."""
    out: list[bytes] = []
    with _figure(title, xlabel, ylabel, out) as ax:
        for (label, (xs, ys)), color in zip(series.items(), itertools.cycle(PALETTE)):
            ax.plot(xs, ys, color=color, linewidth=1.2, label=label, marker="o" if len(xs) <= 12 else None,
                    markersize=3)
            if bands and label in bands:
                spread = bands[label]
                ax.fill_between(xs, [y - s for y, s in zip(ys, spread, strict=True)],
                                [y + s for y, s in zip(ys, spread, strict=True)], color=color, alpha=0.15)
            if ranges and label in ranges:
                lows, highs = ranges[label]
                if not len(lows) == len(highs) == len(xs):
                    raise ValueError(f"{label}: {len(lows)} lows and {len(highs)} highs for {len(xs)} points")
                ax.fill_between(xs, lows, highs, color=color, alpha=0.15)
        if hline is not None:
            ax.axhline(hline[0], color="#999999", linestyle="--", linewidth=1, label=hline[1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return out[0]


def intervals_png(estimates: dict[str, tuple[float, float, float]], title: str, xlabel: str) -> bytes:
    """One horizontal point with its interval per label (``(estimate, low, high)``), a dashed line at 0."""
    out: list[bytes] = []
    with _figure(title, xlabel, "", out) as ax:
        for y, ((estimate, low, high), color) in enumerate(zip(estimates.values(), itertools.cycle(PALETTE))):
            ax.errorbar([estimate], [y], xerr=[[estimate - low], [high - estimate]], fmt="o", color=color, capsize=4)
        ax.set_yticks(range(len(estimates)), list(estimates))
        ax.axvline(0.0, color="#999999", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3, axis="x")
    return out[0]


def png_markdown(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def histogram_table(bin_edges: Sequence[float], counts: Sequence[int]) -> str:
    """The same histogram as a markdown table with text bars, for logs and plain viewers."""
    peak = max(counts) if counts and max(counts) > 0 else 1
    rows = ["| score | documents | |", "|---|---:|---|"]
    for lo, hi, count in zip(bin_edges[:-1], bin_edges[1:], counts, strict=True):
        rows.append(f"| {lo:.2f}-{hi:.2f} | {count} | {'█' * round(20 * count / peak)} |")
    return "\n".join(rows)
