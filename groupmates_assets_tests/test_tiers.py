"""Every test carries exactly one tier marker, so that ``pytest -m unit`` (or integration, e2e, gpu, deploy) runs a
tier and the tiers together are the whole suite. The tiers are the markers registered in pyproject.toml;
``--strict-markers`` there refuses a misspelt one."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from itertools import combinations
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "e2e", "gpu", "deploy")


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
    assert not offenders, "tests without exactly one tier marker (unit, integration, e2e, gpu, deploy):\n" + "\n".join(
        offenders)
    # 5: nothing selected, and no collection error (which would hide the modules it stopped)
    assert done.returncode == 5 and "deselected" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


MISSING_SERVICE_TEST = '''
import pytest
from groupmates_assets_tests.conftest import service_missing

pytestmark = pytest.mark.unit


def test_needs_a_service_that_is_not_there():
    service_missing("no such service here")
'''


def _run_pytest(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("GROUPMATES_REQUIRE_")} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", *args], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=300)


def test_a_missing_service_skips_on_a_developer_machine_and_fails_under_the_ci_flag(tmp_path):
    """`make test` (so CI) sets GROUPMATES_REQUIRE_SERVICES=1: a test whose service is missing fails there."""
    module = REPO / "groupmates_assets_tests" / f"test_zz_missing_service_{tmp_path.name}.py"
    module.write_text(MISSING_SERVICE_TEST)
    try:
        relaxed = _run_pytest([str(module)], {})
        strict = _run_pytest([str(module)], {"GROUPMATES_REQUIRE_SERVICES": "1"})
    finally:
        module.unlink()
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout[-2000:]
    assert strict.returncode == 1 and "1 failed" in strict.stdout, strict.stdout[-2000:]
    assert "a missing service is an error" in strict.stdout


def test_without_cuda_the_gpu_tier_is_deselected_with_a_note_not_skipped():
    import torch

    target = ["-m", "gpu", "groupmates_assets_tests/test_lm_cuda.py"]
    if torch.cuda.is_available():  # a GPU machine: the tier is collected and runs
        done = _run_pytest(["--collect-only", "-q", *target], {})
        assert done.returncode == 0 and "deselected" not in done.stdout, done.stdout[-2000:]
        return
    done = _run_pytest(target, {})
    assert done.returncode == 5 and "deselected" in done.stdout and "skipped" not in done.stdout, done.stdout
    assert "gpu tier: 1 test(s) deselected" in done.stdout
    required = _run_pytest(target, {"GROUPMATES_REQUIRE_GPU": "1"})
    assert required.returncode == 1 and "1 error" in required.stdout, required.stdout[-2000:]
