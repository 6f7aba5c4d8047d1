"""One profile, chosen once: GROUPMATES_PROFILE is resolved and validated once per process; the partitions, the GPU
requests and the platform resource all come from that one value, and a run that asks for another is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import dagster as dg
import pytest

from groupmates_assets import settings
from groupmates_assets.defs.partitions import oracle_block_keys, pool_shards, selection_range_keys
from groupmates_assets.defs.pool.assets import pool_shard
from groupmates_assets.defs.resources import PlatformResource, platform_from_env

pytestmark = pytest.mark.unit

KNOWN = ", ".join(sorted(settings.PROFILES))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the definitions imported anew), with ``env`` over a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_"))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env}, capture_output=True,
                          text=True, timeout=300)


def test_unknown_profile_is_a_value_error_listing_the_known_ones(monkeypatch):
    monkeypatch.setenv("GROUPMATES_PROFILE", "big")
    with pytest.raises(ValueError) as raised:
        settings.resolve_profile_name()
    assert str(raised.value) == f"unknown profile 'big' (GROUPMATES_PROFILE); known profiles: {KNOWN}"
    with pytest.raises(ValueError, match=f"^unknown profile 'nope'; known profiles: {KNOWN}$"):
        settings.get_profile("nope")  # named explicitly: not from the environment
    with pytest.raises(ValueError, match=f"known profiles: {KNOWN}$"):
        PlatformResource(storage_root="unused", profile="nope").settings()
    monkeypatch.setenv("GROUPMATES_PROFILE", "")
    assert settings.resolve_profile_name() == "demo" == settings.DEFAULT_PROFILE


def test_loading_the_code_location_with_an_unknown_profile_fails_in_one_line():
    run = _python("import groupmates_assets.definitions", GROUPMATES_PROFILE="nope")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"ValueError: unknown profile 'nope' (GROUPMATES_PROFILE); known profiles: {KNOWN}")
    assert "KeyError" not in run.stderr


def test_the_profile_is_read_once(monkeypatch):
    """This process loaded ``demo`` (conftest); exporting another profile afterwards changes nothing: the
    partitions built at import and the resource keep agreeing."""
    monkeypatch.setenv("GROUPMATES_PROFILE", "ci")
    assert settings.active_profile_name() == "demo" and settings.get_profile().name == "demo"
    assert platform_from_env().profile == "demo"
    assert PlatformResource(storage_root="unused").settings().name == "demo"  # empty profile: the loaded one


def test_a_run_asking_for_another_profile_is_refused_naming_both(small_pool, tmp_path):
    platform = PlatformResource(storage_root=str(tmp_path / "store"), pool_dir=str(small_pool["pool"]), profile="ci")
    expected = ("this code location was loaded with profile 'demo' (partitions, GPU requests); the run asks for "
                "profile 'ci': set GROUPMATES_PROFILE=ci and reload the code location instead of overriding the "
                "resource")
    with pytest.raises(ValueError) as raised:
        platform.settings()
    assert str(raised.value) == expected
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(pool_shards.name, ["crawl-b"])
        result = dg.materialize([pool_shard], partition_key="crawl-b", instance=instance,
                                resources={"platform": platform}, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_failure)
        assert expected in str(failure.event_specific_data.error.to_string())
        assert not result.get_asset_materialization_events()  # refused before the step computed anything
        assert not any(e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for e in result.all_events)
        same = PlatformResource(storage_root=str(tmp_path / "store"), pool_dir=str(small_pool["pool"]),
                                profile="demo")
        assert dg.materialize([pool_shard], partition_key="crawl-b", instance=instance,
                              resources={"platform": same}).success


@pytest.mark.parametrize("name", ["ci", "dclm-400m"])
def test_partitions_gpu_requests_and_resource_follow_the_profile(name):
    run = _python("""
        import json
        from groupmates_assets.definitions import defs
        def keys(asset):
            return defs.resolve_assets_def(asset).partitions_def.get_partition_keys()
        pretrain = defs.resolve_assets_def("pretrain_checkpoints")
        print(json.dumps({
            "oracle_random": keys("oracle_random"), "oracle_bootstrap": keys("oracle_bootstrap"),
            "selected_documents": keys("selected_documents"),
            "pretrain_tags": pretrain.op.tags,
            "shards_per_run": {a: defs.resolve_assets_def(a).backfill_policy.max_partitions_per_run
                               for a in ("pool_shard", "filtered_pool_shard", "tokenized_pool_shard",
                                         "pool_predictions", "cluster_assignments", "selected_corpus")},
            "platform": defs.resources["platform"].profile,
            "settings": defs.resources["platform"].settings().name,
        }))
    """, GROUPMATES_PROFILE=name, GROUPMATES_DEPLOYMENT="k8s")
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    profile = settings.PROFILES[name]
    assert built["oracle_random"] == oracle_block_keys(profile.oracle.blocks)
    assert built["oracle_bootstrap"] == oracle_block_keys(profile.oracle.bootstrap_blocks)
    assert built["selected_documents"] == selection_range_keys(profile.selection.cluster_ranges)
    limits = json.loads(built["pretrain_tags"]["dagster-k8s/config"])["container_config"]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": str(profile.pretrain.gpus_per_run)}
    assert built["platform"] == built["settings"] == name
    assert set(built["shards_per_run"].values()) == {profile.pool.shards_per_run}


def test_thread_cap_applies_to_steps_that_share_the_machine():
    """The demo's cap (cores / concurrent runs) is for partitioned steps, several of which run at once; an
    unpartitioned step is its stage's only run and keeps the profile's threads."""
    capped = PlatformResource(storage_root="unused", torch_threads=1)
    profile = settings.get_profile()
    assert profile.lm.torch_threads > 1 and profile.influence.torch_threads > 1
    assert capped.settings().lm.torch_threads == capped.settings().influence.torch_threads == 1
    assert capped.settings(alone=True) == profile
    assert PlatformResource(storage_root="unused").settings() == profile
