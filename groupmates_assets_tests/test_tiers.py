"""Every test carries exactly one tier marker, so that ``pytest -m unit`` (or integration, e2e, gpu) runs a tier and
the tiers together are the whole suite. The tiers are the markers registered in pyproject.toml; ``--strict-markers``
there refuses a misspelt one."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from itertools import combinations
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "e2e", "gpu")


def registered_markers() -> list[str]:
    options = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    return [line.split(":", 1)[0].strip() for line in options["markers"]]


def test_the_tiers_are_the_registered_markers():
    assert registered_markers() == list(TIERS)


def test_every_test_has_exactly_one_tier():
    """Collects the whole suite in a process of its own and selects the tests with no tier or with two."""
    untiered = f"not ({' or '.join(TIERS)})"
    two = " or ".join(f"({a} and {b})" for a, b in combinations(TIERS, 2))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", f"({untiered}) or {two}", str(REPO / "groupmates_assets_tests")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    offenders = [line for line in done.stdout.splitlines() if "::" in line]
    assert not offenders, "tests without exactly one tier marker (unit, integration, e2e, gpu):\n" + "\n".join(
        offenders)
    # 5: nothing selected, and no collection error (which would hide the modules it stopped)
    assert done.returncode == 5 and "deselected" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
