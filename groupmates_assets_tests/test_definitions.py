"""The code location loads, with every stage's assets, checks, jobs and sensors."""

from __future__ import annotations

import dagster as dg
import pytest

from groupmates_assets.definitions import build_definitions, defs

pytestmark = pytest.mark.unit


def test_all_definitions_load():
    """Which assets, checks, jobs, sensors and schedules there are is pinned by test_asset_specs.py's snapshot."""
    dg.Definitions.validate_loadable(defs)


def test_every_asset_has_a_code_version_group_and_description():
    for node in defs.resolve_asset_graph().asset_nodes:
        assert node.code_version, node.key
        assert node.group_name in {"pool", "quality", "tokenize", "lm", "oracle", "influence",
                                   "selection", "corpus", "pretrain", "evaluation", "causal", "report"}, node.key
        assert node.description, node.key


def test_environment_configures_storage_and_pool(monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPMATES_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("GROUPMATES_POOL_DIR", str(tmp_path / "pool"))
    platform = build_definitions().resources["platform"]
    assert platform.storage().root == str(tmp_path / "store")
    assert platform.pool_location()[1] == str(tmp_path / "pool")
