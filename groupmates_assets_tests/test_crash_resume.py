"""Crash and resume: each kind of step is SIGKILLed at a random point, rerun, and must end with outputs identical to
an uninterrupted run, no duplicate rows, and no partial file ever visible under a final name.

The world: the main job (``groupmates demo --until selection``, ``ci`` profile) on a small hand-written pool.
For every step kind the test then
  1. removes the step's outputs and runs it uninterrupted in a process of its own, counting the failpoints it
     passes (``groupmates_assets.lib.failpoints``: mid-computation points, and each write both complete under
     its temporary name and visible under its final one);
  2. removes them again, reruns it with a kill at one of those points drawn at random (seeded, printed), and
     checks that the process died of SIGKILL and that every file visible under a final name is whole;
  3. reruns it to completion and compares every output file with step 1's (bytes, or content without timing
     fields), and the row keys for duplicates.
Step 1's outputs are also compared with the world's own, made by the demo's daemon-launched runs: the same
configuration gives the same bytes whatever process ran it (determinism).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load as load_safetensors

from groupmates_assets.lib import failpoints
from groupmates_assets.testing.processes import stop_session
from groupmates_assets_tests.conftest import good_texts, jsonl_bytes, records, write_shard

pytestmark = pytest.mark.e2e

# JSON fields that hold wall-clock figures; every other byte must match.
TIMING_KEYS = {"seconds", "docs_per_second", "mb_per_second", "documents_per_second", "tokens_per_second",
               "trajectories_per_second", "probes_per_hour", "wall_seconds", "started_at", "finished_at"}
SEED = int(os.environ.get("GROUPMATES_CRASH_SEED", "20261127"))


@dataclass(frozen=True)
class StepKind:
    name: str
    job: str
    partition: str | None
    outputs: tuple[str, ...]  # globs under the storage root: what the step writes and the test removes
    row_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (parquet glob, key columns) that must be unique


STEPS = [
    StepKind("per-shard filtering", "filter_shards_job", "crawl-b", ("filtered_pool/crawl-b/*",),
             (("filtered_pool/crawl-b/kept.parquet", ("doc_id",)), ("filtered_pool/crawl-b/dropped.parquet",
                                                                   ("doc_id",)),
              ("filtered_pool/crawl-b/heldout.parquet", ("doc_id",)))),
    StepKind("an oracle block", "oracle_random_job", "block-001", ("oracle/random/*/block-001/*",),
             (("oracle/random/*/block-001/*.parquet", ("trajectory_id",)),)),
    StepKind("per-shard prediction", "pool_predictions_job", "crawl-a", ("selection/predictions/*/crawl-a.parquet",),
             (("selection/predictions/*/crawl-a.parquet", ("doc_id",)),)),
    StepKind("selection", "select_documents_job", "clusters-000-of-002",
             ("selection/methods/group_mates/*/clusters-000-of-002",  # one file per shard, then the summary
              "selection/methods/group_mates/*/clusters-000-of-002.json",
              "selection/methods/sequences/*/clusters-000-of-002*.parquet"),
             (("selection/methods/group_mates/*/clusters-000-of-002/*.parquet", ("doc_id",)),
              ("selection/methods/sequences/*/clusters-000-of-002.parquet", ("doc_id",)))),
    StepKind("pretraining", "pretrain_job", "mates", ("pretrain/mates/*",)),
]


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DAGSTER_", "GROUPMATES_")) or k == "GROUPMATES_SOURCE_CACHE"}
    # one torch thread everywhere: the world's daemon-launched runs and the test's own steps sum in the same order
    env.update(GROUPMATES_HOME=str(root), GROUPMATES_POOL_DIR=str(root / "pool"), GROUPMATES_PROFILE="ci",
               DAGSTER_HOME=str(root / "dagster_home"), PYTHONUNBUFFERED="1", GROUPMATES_TORCH_THREADS="1", **extra)
    return env


# The determinism test's twin and the module's world build side by side, so either may take longer than alone.
WORLD_TIMEOUT_SECONDS = 2400


@dataclass
class WorldBuild:
    """A world's main job running in the background (its own session, output to files in its folder)."""

    root: Path
    process: subprocess.Popen

    def wait(self, timeout: float = WORLD_TIMEOUT_SECONDS) -> Path:
        returncode = self.process.wait(timeout=timeout)
        output = (self.root / "demo.out").read_text(errors="replace") + (self.root / "demo.err").read_text(
            errors="replace")
        assert returncode == 0, output[-6000:]
        # pretraining is the one step kind the demo stops before: its uninterrupted run is made below like the others
        return self.root

    def stop(self) -> None:
        """SIGTERM (the demo stops its services within 10 s), then SIGKILL for the whole session if it has not."""
        stop_session(self.process, grace_s=30)


def start_world(root: Path) -> WorldBuild:
    """The main job up to the selected corpora on a small pool, in ``root`` (a fresh folder), started."""
    for name, offset in (("crawl-a.jsonl.zst", 0), ("crawl-b.jsonl.gz", 1000), ("crawl-c.jsonl", 2000)):
        write_shard(root / "pool" / name, jsonl_bytes(records(160, 140, offset)))
    # the classifier's positives, standing in for the embedded pool's held-out Wikipedia summaries
    positives = [{"text": t + " Further reading follows.", "source": "reference"} for t in good_texts(300)]
    write_shard(root / "storage" / "embedded_pool" / "positives" / "wikipedia-summaries-hq.jsonl.zst",
                jsonl_bytes(positives))
    with open(root / "demo.out", "wb") as out, open(root / "demo.err", "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "groupmates_assets.cli", "demo", "--until", "selection"],
                                   env=_env(root), stdout=out, stderr=err, start_new_session=True)
    return WorldBuild(root, process)


@pytest.fixture(scope="module")
def twin_build(tmp_path_factory):
    """The determinism test's second world, started before ``world`` (which the test names after it) so that the
    two build at the same time; stopped at the end if the test did not wait for it."""
    build = start_world(tmp_path_factory.mktemp("crash-twin"))
    yield build
    build.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    build = start_world(tmp_path_factory.mktemp("crash-world"))
    try:
        return build.wait()
    finally:
        build.stop()


def _run_step(world: Path, step: StepKind, **extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "groupmates_assets_tests.crash_child", step.job, step.partition or ""]
    # a session of its own: the kill takes the step's whole process group (replica workers too), never pytest
    return subprocess.run(command, env=_env(world, **extra), capture_output=True, text=True, timeout=600,
                          start_new_session=True)


def _outputs(storage: Path, step: StepKind) -> list[Path]:
    found = {p for pattern in step.outputs for p in storage.glob(pattern)}
    files = {f for p in found for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()}
    return sorted(files)


def _remove_outputs(storage: Path, step: StepKind) -> None:
    for pattern in step.outputs:
        for path in storage.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") or ".tmp-" in path.name


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _digest(path: Path) -> str:
    """The bytes' hash, or for JSON the hash of the content without timing fields."""
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(_scrub(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _snapshot(storage: Path, step: StepKind) -> dict[str, str]:
    return {str(p.relative_to(storage)): _digest(p) for p in _outputs(storage, step) if not _is_temporary(p)}


def _assert_whole(path: Path) -> None:
    """A file under its final name must read completely in its format."""
    data = path.read_bytes()
    if path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".parquet":
        pq.read_table(io.BytesIO(data))
    elif path.suffix == ".npy":
        np.load(io.BytesIO(data), allow_pickle=False)
    elif path.suffix == ".safetensors":
        load_safetensors(data)
    elif path.suffix == ".pt":
        import torch

        torch.load(io.BytesIO(data), weights_only=True)


def _assert_unique_rows(storage: Path, step: StepKind) -> None:
    for pattern, columns in step.row_keys:
        keys = [tuple(row[c] for c in columns) for path in sorted(storage.glob(pattern)) if not _is_temporary(path)
                for row in pq.read_table(path, columns=list(columns)).to_pylist()]
        assert keys, f"no rows in {pattern}"
        assert len(keys) == len(set(keys)), f"duplicate {columns} rows in {pattern}"


def test_two_runs_of_one_configuration_give_byte_identical_artifacts(twin_build: WorldBuild, world: Path):
    """Determinism (CPU): a second run of the same configuration and seeds, in another folder, writes the same
    bytes in every artifact from the filtered pool to the selections and the tokenized corpora; only wall-clock
    fields and the folder's own name differ. Each run has its own instance; the twin starts first, so the two
    usually build at the same time."""
    twin = twin_build.wait()
    first, second = _tree_digests(world), _tree_digests(twin)
    assert sorted(first) == sorted(second)
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, differ
    assert any(k.startswith("selection/methods/group_mates/") for k in first)


def _tree_digests(root: Path) -> dict[str, str]:
    """Every artifact up to the selection stage: relative path -> hash of its content with ``root`` replaced and
    timing fields dropped (JSON and Parquet), or of its bytes."""
    storage, out = root / "storage", {}
    for path in sorted(storage.rglob("*")):
        relative = str(path.relative_to(storage))
        if not path.is_file() or relative.startswith(("pretrain/", "embedded_pool/")) or _is_temporary(path):
            continue
        if path.suffix == ".json":
            content = json.dumps(_scrub(json.loads(path.read_text())), sort_keys=True)
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            content = json.dumps([str(table.schema), _scrub(table.to_pylist())], default=repr)
        else:
            out[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            continue
        out[relative] = hashlib.sha256(content.replace(str(root), "<root>").encode()).hexdigest()
    return out


@pytest.mark.parametrize("step", STEPS, ids=[s.name.replace(" ", "-") for s in STEPS])
def test_sigkill_at_a_random_point_then_rerun_gives_the_uninterrupted_outputs(world: Path, step: StepKind,
                                                                              tmp_path: Path):
    storage = world / "storage"
    made_by_demo = _snapshot(storage, step)
    _remove_outputs(storage, step)
    log = tmp_path / "failpoints.log"
    clean = _run_step(world, step, **{failpoints.LOG_ENV: str(log)})
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = _snapshot(storage, step)
    assert reference, f"{step.name}: the step wrote nothing under {step.outputs}"
    if made_by_demo:  # the same configuration gives the same outputs in a fresh process as inside the demo
        assert made_by_demo == reference, f"{step.name}: outputs differ from the demo's own run"
    _assert_unique_rows(storage, step)
    passed = log.read_text().splitlines()
    assert any(name.endswith(".visible") for name in passed), f"{step.name}: no failpoint on its writes"

    kill_at = random.Random(f"{SEED}:{step.name}").randint(1, len(passed))
    print(f"{step.name}: {len(passed)} failpoints; SIGKILL at #{kill_at} ({passed[kill_at - 1]})")
    _remove_outputs(storage, step)
    killed = _run_step(world, step, **{failpoints.LOG_ENV: str(tmp_path / "killed.log"),
                                       failpoints.KILL_AT_ENV: str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    for path in _outputs(storage, step):
        if not _is_temporary(path):
            _assert_whole(path)  # whatever is visible after the kill is complete

    rerun = _run_step(world, step)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # the killed run was left STARTED, holding its pool slot: the rerun marked it failed and freed the slot
    assert "released dead run" in rerun.stderr
    assert _snapshot(storage, step) == reference, f"{step.name}: outputs after kill + rerun differ"
    _assert_unique_rows(storage, step)
    # the write the kill interrupted left a temporary (hidden from readers); the rerun's writes deleted it
    leftovers = [p for p in _outputs(storage, step) if _is_temporary(p)]
    assert not leftovers, leftovers
