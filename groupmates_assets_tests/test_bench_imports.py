"""The benchmarks stand on the package alone: every ``bench/`` module imports without the test package (or
pytest), taking the servers and helpers it shares with the tests from ``groupmates_assets.testing``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = ("groupmates_assets_tests", "pytest", "_pytest")
IMPORT_ALL = """
    import importlib, json, pathlib, sys
    names = sorted("bench." + p.stem for p in pathlib.Path("bench").glob("*.py") if p.stem != "__init__")
    for name in names:
        importlib.import_module(name)
    print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def test_every_bench_module_imports_without_the_test_package():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(IMPORT_ALL)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "bench.bench_s3" in result["imported"] and "bench.run" in result["imported"]
    leaked = [name for name in result["loaded"] if name.split(".")[0] in TEST_ONLY]
    assert not leaked, f"bench/ imports {leaked}: take shared helpers from groupmates_assets.testing"


def test_bench_run_help_starts():
    done = subprocess.run([sys.executable, "-m", "bench.run", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--only" in done.stdout, done.stderr[-3000:]
