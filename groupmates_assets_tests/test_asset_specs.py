"""The code location's shape is pinned by a committed snapshot (as dagster-open-platform pins its asset specs):
every asset's key, partitions, deps, checks, code version, group, kinds, tags, pools and backfill policy, and what
each job, sensor and schedule targets (``groupmates_assets.testing.asset_specs``).

A deliberate change rewrites the snapshot, and the diff of ``snapshots/asset_specs.json`` is reviewed with it:

    GROUPMATES_UPDATE_SNAPSHOTS=1 pytest -q groupmates_assets_tests/test_asset_specs.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_specs.json"
UPDATE_ENV = "GROUPMATES_UPDATE_SNAPSHOTS"


def load_snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


def _current_specs() -> str:
    """The dump from a fresh interpreter with no GROUPMATES_* variable: the defaults, whatever this process or the
    shell has set (the profile and the deployment target change partitions and executors)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GROUPMATES_")}
    done = subprocess.run([sys.executable, "-m", "groupmates_assets.testing.asset_specs"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_asset_specs_match_the_snapshot():
    current = _current_specs()
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(current, encoding="utf-8")
    expected, actual = load_snapshot(), json.loads(current)
    changed = _differences(expected, actual)
    assert not changed, (f"the definitions differ from snapshots/{SNAPSHOT.name} (snapshot -> now): {changed}; if "
                         f"that is intended, rerun with {UPDATE_ENV}=1 and commit the file")


def _differences(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """Section -> name -> field -> [snapshot value, current value], only where they differ (a missing entry is
    None)."""
    changed: dict[str, Any] = {}
    for section in sorted(expected.keys() | actual.keys()):
        old, new = expected.get(section, {}), actual.get(section, {})
        for name in sorted(old.keys() | new.keys()):
            before, after = old.get(name), new.get(name)
            if before == after:
                continue
            if isinstance(before, dict) and isinstance(after, dict):
                fields = {f: [before.get(f), after.get(f)] for f in sorted(before.keys() | after.keys())
                          if before.get(f) != after.get(f)}
            else:
                fields = {"": [before, after]}
            changed.setdefault(section, {})[name] = fields
    return changed
