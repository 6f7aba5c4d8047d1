"""`dg check defs` accepts the project as cloned: pyproject.toml's [tool.dg] names the root module and the code
location module, and dg loads groupmates_assets.definitions from the project root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_dg_check_defs_passes(tmp_path: Path):
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # VIRTUAL_ENV: this interpreter's environment is the active one (dg warns when the project's .venv differs).
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "VIRTUAL_ENV": sys.prefix}
    result = subprocess.run([str(Path(sys.executable).parent / "dg"), "check", "defs"], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully." in result.stdout, result.stdout + result.stderr
