"""Plots for metadata render real PNGs that the Dagster UI can inline."""

import pytest

from groupmates_assets.lib import plots

pytestmark = pytest.mark.unit


def test_histogram_and_line_render_png_markdown():
    hist = plots.histogram_png([0, 0.5, 1], [3, 5], "t", "x", threshold=0.4)
    line = plots.line_png([1, 2, 3], [3.0, 2.0, 1.5], "loss", "step", "loss")
    for png in (hist, line):
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert plots.png_markdown(hist, "h").startswith("![h](data:image/png;base64,iVBOR")
    table = plots.histogram_table([0, 0.5, 1], [3, 6])
    assert "| 0.50-1.00 | 6 | ████████████████████ |" in table
