"""Security (issue 8, item 4): a test for each point.

1. Nothing unpickles data or checkpoints that did not come from this pipeline: a static scan of every module (AST,
   with import aliases resolved), and tampered files (a pickle whose loading would create a marker file) in place
   of each loaded artifact: the optimizer state of a checkpoint (probe, oracle worker, pretraining resume and
   stage-1 init), the weights, a ``.npy`` array, an encoder directory. Each load fails with a clear error and the
   marker never appears.
2. Secrets never reach logs, metadata, run config or the storage root (local variant; ``test_s3.py`` covers S3).
3. Partition keys and shard names are validated before they become paths.
4. The webserver binds to loopback unless told otherwise.

Pre-existing tests that prove parts of these points (kept, not repeated here):
  2. test_s3.py::test_pool_filter_selection_on_s3_equal_local (no S3 key in events or metadata) and
     ::test_definitions_take_endpoint_from_env_and_offer_boto3 (no credentials configured); test_deployment.py::
     test_no_plaintext_secrets (compose files and docker/.env.example).
  3. test_storage.py::test_unsafe_paths_are_refused (every artifact path: no '..', absolute, empty segment, '\\',
     NUL); test_shards.py::test_shard_keys_from_paths_and_validation and
     ::test_discover_reports_conflicts_and_bad_names.
  4. test_deployment.py::test_only_the_webserver_is_published_and_only_on_loopback (compose ports) and
     test_ui_browser.py::test_webserver_listens_on_loopback_only (the live webserver's sockets).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import torch

from groupmates_assets import cli
from groupmates_assets.lib import lm
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.lm.checkpoint import UnsafeCheckpointError
from groupmates_assets.lib.storage import Storage

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ 1a. static scan for unsafe loads

SCANNED_DIRS = ("groupmates_assets", "bench")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "joblib", "shelve", "jsonpickle"}
PICKLE_ERRORS = {"UnpicklingError", "PicklingError", "PickleError"}  # importing an exception class loads nothing
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
# from_pretrained on these reads JSON (configs, tokenizers), never weights
NON_WEIGHT_LOADERS = re.compile(r"(Config|Tokenizer|TokenizerFast|Processor|FeatureExtractor|ImageProcessor)$")


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` (import aliases resolved); None for calls on computed values."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that could unpickle untrusted bytes, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    problems: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        problems.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):  # first every import (a function-local one too), so aliases are known everywhere
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in BANNED_MODULES:
                    flag(node, f"imports {alias.name}")
                aliases[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] in BANNED_MODULES and any(a.name not in PICKLE_ERRORS for a in node.names):
                flag(node, f"imports from {node.module}: {', '.join(a.name for a in node.names)}")
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        weights_only, allow_pickle = _keyword(node, "weights_only"), _keyword(node, "allow_pickle")
        if name in ("torch.load", "torch.serialization.load") and not _is_const(weights_only, True):
            flag(node, f"{name} without weights_only=True")
        elif weights_only is not None and not _is_const(weights_only, True):
            flag(node, f"{name or 'a call'} with weights_only other than True")
        if allow_pickle is not None and not _is_const(allow_pickle, False):
            flag(node, f"{name or 'a call'} with allow_pickle other than False")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if (_dotted(loader, aliases) or "").rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                flag(node, f"{name} without a safe Loader")
        if name in UNSAFE_YAML or name.endswith(("UnsafeLoader", "yaml.Loader", "FullLoader")):
            flag(node, f"{name}")
        if name.endswith("read_pickle"):
            flag(node, f"{name}")
        if name in ("importlib.import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] in BANNED_MODULES:
            flag(node, f"imports {node.args[0].value} dynamically")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            receiver = (_dotted(node.func.value, aliases) or "").rsplit(".", 1)[-1]
            if not NON_WEIGHT_LOADERS.search(receiver) and not _is_const(_keyword(node, "use_safetensors"), True):
                flag(node, f"{receiver}.from_pretrained without use_safetensors=True")
        remote_code = _keyword(node, "trust_remote_code")
        if remote_code is not None and not _is_const(remote_code, False):
            flag(node, f"{name or 'a call'} with trust_remote_code")
    return problems


def _python_files() -> Iterator[Path]:
    for folder in SCANNED_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_module_can_unpickle_untrusted_data():
    """torch.load only with weights_only=True, model weights from safetensors only, no pickle/marshal/dill/joblib/
    shelve, np.load never with allow_pickle=True, yaml only with a safe loader: in every module of the package and
    the benchmarks."""
    files = list(_python_files())
    assert len(files) > 40  # the scan sees the whole package, not an empty folder
    problems = [p for path in files for p in unsafe_loads(path.read_text(encoding="utf-8"),
                                                           str(path.relative_to(REPO)))]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


def test_the_scan_finds_every_kind_of_unsafe_load():
    """The scanner itself, on code that does each forbidden thing once (and on the safe forms, which pass)."""
    bad = """\
import pickle
import dill as d
from joblib import load
import numpy as np
import torch as t
from torch import load as tload
import yaml
from transformers import AutoModel
import pandas as pd
def f(p):
    t.load(p)
    tload(p, weights_only=False)
    np.load(p, allow_pickle=True)
    yaml.load(p)
    yaml.load(p, Loader=yaml.Loader)
    yaml.unsafe_load(p)
    AutoModel.from_pretrained(p)
    AutoModel.from_pretrained(p, use_safetensors=True, trust_remote_code=True)
    pd.read_pickle(p)
    __import__("marshal")
"""
    lines = sorted(int(p.split(":")[1]) for p in unsafe_loads(bad, "bad.py"))
    assert lines == [1, 2, 3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], unsafe_loads(bad, "bad.py")
    good = """\
from pickle import UnpicklingError
import numpy as np
import torch
import yaml
from transformers import AutoConfig, AutoModel
def f(p):
    torch.load(p, map_location="cpu", weights_only=True)
    np.load(p, mmap_mode="r", allow_pickle=False)
    np.save(p, np.zeros(2), allow_pickle=False)
    yaml.load(p, Loader=yaml.SafeLoader)
    yaml.safe_load(p)
    AutoConfig.from_pretrained(p)
    AutoModel.from_pretrained(p, use_safetensors=True)
"""
    assert unsafe_loads(good, "good.py") == []


# ------------------------------------------------------------- 1b. tampered files are refused, never executed

# numpy's refusals of an object array: reading (allow_pickle=False) or memory-mapping it (objects cannot be mapped)
NOT_UNPICKLED = r"allow_pickle=False|can't be memory-mapped: Python objects"


class _Payload:
    """What a tampered file would carry: unpickling it runs code (here: it creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _payload_bytes(marker: Path) -> bytes:
    """A raw pickle of an optimizer-like dict holding the payload."""
    return pickle.dumps({"state": {0: _Payload(marker)}, "param_groups": []})


def test_the_payload_is_live(tmp_path: Path):
    """The payload really runs code when fully unpickled: the refusals below are not vacuous."""
    marker = tmp_path / "ran"
    pickle.loads(_payload_bytes(marker))  # the unsafe load this project never does
    assert marker.exists()


TINY = lm.LMShape("security-test", d_model=16, n_layers=1, n_heads=2, seq_len=8, vocab_size=64, ffn_hidden=32)
TINY_OPTIM = lm.OptimConfig(warmup_steps=1, total_steps=4)


def _save_checkpoint(directory: Path, step: int = 2) -> Path:
    model = lm.build_model(TINY, device="cpu")
    optimizer = lm.make_optimizer(model, TINY_OPTIM)
    lm.train_step(model, optimizer, torch.randint(0, TINY.vocab_size, (2, TINY.seq_len + 1)), TINY_OPTIM)
    return lm.save_checkpoint(directory, model, optimizer, TINY, TINY_OPTIM, step)


def _tamper(path: Path, marker: Path, how: str) -> None:
    """Replace a checkpoint file by the payload: as torch.save writes it (zip), or as a raw pickle."""
    if how == "torch-zip":
        torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, path)
    else:
        path.write_bytes(_payload_bytes(marker))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw payload: not torch's own
@pytest.mark.parametrize("how", ["torch-zip", "raw-pickle"])
def test_tampered_optimizer_state_is_refused_without_running_it(tmp_path: Path, how: str):
    checkpoint = _save_checkpoint(tmp_path / "ckpt")
    lm.load_checkpoint(checkpoint, "cpu")  # the pipeline's own checkpoint loads
    marker = tmp_path / "ran"
    _tamper(checkpoint / "optimizer.pt", marker, how)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*optimizer\.pt: it .* not written by this "
                       r"pipeline") as refused:
        lm.load_checkpoint(checkpoint, "cpu")
    if how == "torch-zip":  # protocol 2 (torch.save): the refused global is named
        assert "names exec" in str(refused.value)
    assert not marker.exists()


def test_tampered_weights_are_refused_without_running_them(tmp_path: Path):
    """Weights are safetensors (a header and raw tensors): a pickle in their place is not parsed as one."""
    checkpoint = _save_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (checkpoint / "model.safetensors").write_bytes(_payload_bytes(marker))
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
        lm.load_weights(checkpoint, "cpu")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["resume", "stage-1 init"])
def test_pretraining_refuses_a_tampered_checkpoint(tmp_path: Path, where: str):
    """lib/pretraining: resuming a run from its last checkpoint, and stage 2 starting from the stage-1 checkpoint."""
    from groupmates_assets.lib import pretraining as pt

    storage = Storage(str(tmp_path / "store"))
    storage.write_numpy("corpus/contexts.npy", np.zeros((8, TINY.seq_len + 1), dtype=np.uint32))
    storage.write_numpy("corpus/orders.npy", np.arange(8, dtype=np.int64)[None, :])
    folder = pt.checkpoint_dir("runs/r", 2) if where == "resume" else "probe"
    local = _save_checkpoint(tmp_path / "local")
    storage.put_dir(str(local), folder, pt.CHECKPOINT_FILES)
    marker = tmp_path / "ran"
    _tamper(Path(storage.path(f"{folder}/optimizer.pt")), marker, "torch-zip")
    spec = pt.RunSpec(run_dir="runs/r", contexts_path="corpus/contexts.npy", orders_path="corpus/orders.npy",
                      seed_index=0, shape=TINY.to_dict(), optim=TINY_OPTIM.to_dict(), batch_size=2, start_step=2,
                      init_checkpoint=None if where == "resume" else folder, init_seed=0, checkpoint_every=1)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{folder}/optimizer.pt")):
        pt.run_training(storage, spec, "cpu", log=lambda _: None)
    assert not marker.exists()


def test_oracle_worker_refuses_a_tampered_checkpoint_or_pickled_pool(tmp_path: Path):
    """lib/oracle's worker loads the probe checkpoint and the probe pool (.npy) before any trajectory."""
    from groupmates_assets.lib import oracle as oracle_lib

    good, bad = _save_checkpoint(tmp_path / "good"), _save_checkpoint(tmp_path / "bad")
    marker = tmp_path / "ran"
    _tamper(bad / "optimizer.pt", marker, "torch-zip")
    pool_path = tmp_path / "contexts.npy"
    np.save(pool_path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)  # a tampered probe pool

    def job(checkpoint: Path) -> Any:
        return oracle_lib.BlockJob(
            storage_root=str(tmp_path / "store"), out_dir="oracle/x", checkpoint_dir=str(checkpoint),
            pool_path=str(pool_path), reference_examples=[([1, 2], [3])], context_ids=["a:0"],
            plan=np.zeros((1, 1), np.int64), trajectory_ids=np.zeros(1, np.int64), block=0, part_size=1,
            torch_threads=torch.get_num_threads(), device="cpu")

    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt"):
        oracle_lib._init_worker(job(bad))
    with pytest.raises(ValueError, match=NOT_UNPICKLED):
        oracle_lib._init_worker(job(good))
    assert not oracle_lib._WORKER and not marker.exists()


@pytest.mark.parametrize("mmap", [True, False])
def test_storage_refuses_pickled_arrays(tmp_path: Path, mmap: bool):
    """Every array an asset reads goes through Storage.read_numpy (allow_pickle=False)."""
    storage = Storage(str(tmp_path / "store"))
    marker = tmp_path / "ran"
    Path(storage.path("a")).mkdir(parents=True)
    np.save(storage.path("a/contexts.npy"), np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=NOT_UNPICKLED):
        storage.read_numpy("a/contexts.npy", mmap=mmap)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw payload: not torch's own
@pytest.mark.parametrize("bypass", [False, True], ids=["pytorch_model.bin", "config-named adapter_model.bin"])
def test_encoder_directory_loads_safetensors_only(tmp_path: Path, bypass: bool):
    """A user-supplied encoder directory whose weights are a pickle is refused, the pickle never run: a plain
    pytorch_model.bin is not even opened (use_safetensors=True); a config.json naming a .bin file (the one
    transformers lets through) is read with weights_only=True and refused."""
    from transformers import BertConfig

    from groupmates_assets.lib.influence import encoder as enc

    folder = tmp_path / "encoder"
    BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(folder)
    if bypass:  # a hand-edited config (save_pretrained never writes this key)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    marker = tmp_path / "ran"
    (folder / ("adapter_model.bin" if bypass else "pytorch_model.bin")).write_bytes(_payload_bytes(marker))
    with pytest.raises(Exception, match=r"(?i)weights only load failed|unable to load weights" if bypass
                       else r"no file named model\.safetensors"):
        enc.load_pretrained_encoder(enc.EncoderSource(str(folder), "tampered", f"directory {folder}"))
    assert not marker.exists()


# ---------------------------------------------------------------------------- 2. secrets stay out of everything

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINELKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "sentinel-secret-access-key-6c1d0e",
    "AWS_SESSION_TOKEN": "sentinel-session-token-9b7a41",
    "GROUPMATES_S3_ENDPOINT_URL": "http://sentinel-user:sentinel-endpoint-password-3f2e@s3.sentinel.invalid:9000",
    "GROUPMATES_S3_REGION": "sentinel-region-5a0c",
    "GROUPMATES_API_TOKEN": "sentinel-groupmates-token-71e4",  # an unrelated secret: catches dumps of the environment
    "DAGSTER_PG_PASSWORD": "sentinel-postgres-password-0d93",
}
NEEDLES = ["AKIASENTINELKEYID0001", "sentinel-secret-access-key", "sentinel-session-token",
           "sentinel-endpoint-password", "sentinel-region-5a0c", "sentinel-groupmates-token",
           "sentinel-postgres-password"]


def _leaks(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle in text]


def test_definitions_hold_no_secret_literal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The code location's resources take the endpoint and region as EnvVar (shown by name, resolved per run) and
    no credentials at all (botocore's default chain reads them), so no secret is in the definitions."""
    from groupmates_assets.definitions import build_definitions

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GROUPMATES_STORAGE_ROOT", str(tmp_path / "store"))
    resources = build_definitions().resources
    platform, s3 = resources["platform"], resources["s3"]
    assert isinstance(platform.s3_endpoint_url, dg.EnvVar) and isinstance(platform.s3_region, dg.EnvVar)
    assert s3.aws_access_key_id is None and s3.aws_secret_access_key is None and s3.aws_session_token is None
    for name, resource in resources.items():
        fields = json.dumps(resource.model_dump(), default=str)  # an EnvVar dumps as the variable's name
        assert not _leaks(fields), f"resource {name}: {fields}"


def test_secrets_stay_out_of_logs_metadata_run_config_and_storage(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_pool, capfd, caplog):
    """Local-storage variant of test_s3's checks: register, train the classifier and filter through the code
    location's own definitions with secrets in the environment; none appears in an event, metadata value, run
    config, job snapshot, captured output, or any file under the storage root or the instance."""
    from groupmates_assets.definitions import build_definitions
    from groupmates_assets.defs.partitions import pool_shards

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GROUPMATES_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("GROUPMATES_POOL_DIR", str(small_pool["pool"]))
    defs = build_definitions()
    keys = ["crawl-a__part-1", "crawl-b"]
    seen: list[str] = []
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(pool_shards.name, keys)
        results = [defs.resolve_job_def("register_pool_shards_job").execute_in_process(instance=instance,
                                                                                       partition_key=key)
                   for key in keys]
        results.append(defs.resolve_job_def("quality_classifier_job").execute_in_process(
            instance=instance,
            run_config={"ops": {"quality_classifier": {"config": {"positives_path": str(small_pool["positives"])}}}}))
        results.append(defs.resolve_job_def("filter_shards_job").execute_in_process(instance=instance,
                                                                                    partition_key="crawl-b"))
        assert all(r.success for r in results)
        materializations = [m for r in results for e in r.all_events if e.is_step_materialization
                            for m in [e.event_specific_data.materialization]]
        assert {m.asset_key.path[0] for m in materializations} >= {"pool_shard", "quality_classifier",
                                                                   "filtered_pool_shard"}
        for m in materializations:
            seen += [repr(value) for value in m.metadata.values()]
        for result in results:
            run = instance.get_run_by_id(result.run_id)
            seen.append(json.dumps(run.run_config, default=str))
            seen.append(dg.serialize_value(instance.get_job_snapshot(run.job_snapshot_id)))
            seen += [dg.serialize_value(entry) for entry in instance.all_logs(result.run_id)]
    seen.append(caplog.text)
    seen += list(capfd.readouterr())
    leaks = [(needle, text[:200]) for text in seen for needle in _leaks(text)]
    assert not leaks, leaks
    # what was searched holds what it should: metadata paths, the run config, the endpoint EnvVar by its name
    for expected in (str(tmp_path / "store"), "positives_path", "GROUPMATES_S3_ENDPOINT_URL"):
        assert any(expected in text for text in seen), expected
    files = [p for folder in (tmp_path / "store", tmp_path / "dagster") for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked_files = [str(p) for p in files for needle in NEEDLES if needle.encode() in p.read_bytes()]
    assert not leaked_files, leaked_files


# ---------------------------------------------------------------- 3. partition keys and shard names as paths

BAD_KEYS = [
    "", ".", "..", "../escape", "a/../../escape", "..__..__escape", "x..y", "/abs/escape", "a/b", "a\\b", "C:",
    "nul\0byte", "new\nline", "trailing-newline\n", "tab\tkey", " leading-space", "inner space", ".hidden",
    "-dash-first", "_underscore-first", "ünïcode", "full\uff0ewidth", "right\u202eto-left", "zero\u200bwidth",
    "a" * 201, "query?x", "star*", "percent%2e%2e",
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=[repr(k)[:30] for k in BAD_KEYS])
def test_shard_key_validation_rejects_unsafe_keys(key: str):
    with pytest.raises(shard_io.InvalidShardKeyError, match="invalid shard key"):
        shard_io.validate_shard_key(key)


def test_shard_key_validation_accepts_the_pipelines_keys():
    for key in ["crawl-b", "crawl-a__part-0", "pool-00007", "CC-MAIN-2023.06_shard=3", "a" * 200]:
        assert shard_io.validate_shard_key(key) == key
    assert shard_io.shard_key_for("global-shard_01/shard_0003.jsonl.zst") == "global-shard_01__shard_0003"
    for relative in ["../escape.jsonl", "a/../b.jsonl", "sub dir/x.jsonl", "x\n.jsonl", "ünïcode.parquet"]:
        with pytest.raises(shard_io.InvalidShardKeyError):
            shard_io.shard_key_for(relative)


BAD_FILE_NAMES = ["bad name.jsonl", "x..y.jsonl", "ünïcode.jsonl", "full\uff0ewidth.jsonl",
                  "right\u202egpj.jsonl", "new\nline.jsonl", "-dash.jsonl", "a" * 230 + ".jsonl",
                  "back\\slash.jsonl", "sub dir/part-0.jsonl", "dots..dir/part-0.jsonl"]


def test_discovery_skips_badly_named_shard_files_with_a_clear_message(tmp_path: Path):
    """Discovery (the sensor and the demo) reports each file whose name cannot become a safe key and goes on; the
    sensor adds partitions for the healthy shards only."""
    import fsspec

    from groupmates_assets.defs.pool.sensors import pool_shard_sensor
    from groupmates_assets.defs.resources import PlatformResource

    pool = tmp_path / "pool"
    for name in ["good.jsonl", "nested/part-0.jsonl", *BAD_FILE_NAMES]:
        (pool / name).parent.mkdir(parents=True, exist_ok=True)
        (pool / name).write_bytes(b'{"text": "a document"}\n')
    shards, problems = shard_io.discover_shards(fsspec.filesystem("file"), str(pool))
    assert [s.key for s in shards] == ["good", "nested__part-0"]
    assert len(problems) == len(BAD_FILE_NAMES), problems
    for name in BAD_FILE_NAMES:
        problem = next((p for p in problems if p.startswith(str(pool / name) + ":")), None)
        assert problem is not None and "invalid shard key" in problem, (name, problems)
    platform = PlatformResource(storage_root=str(tmp_path / "store"), pool_dir=str(pool))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        tick = pool_shard_sensor(dg.build_sensor_context(instance=instance, resources={"platform": platform}))
    assert tick.dynamic_partitions_requests[0].partition_keys == ["good", "nested__part-0"]


def _files_outside(root: Path, inside: tuple[Path, ...]) -> set[Path]:
    return {p for p in root.rglob("*") if not any(p == d or d in p.parents for d in inside)}


def _failure_text(result) -> str:
    """The step failure's messages: the error, its causes and a dg.Failure's description."""
    data = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    texts, error = [data.user_failure_data.description if data.user_failure_data else ""], data.error
    while error is not None:
        texts.append(error.message)
        error = error.cause or error.context
    return " ".join(t for t in texts if t)


POOL_SHARD_ASSETS = ["pool_shard", "filtered_pool_shard", "tokenized_pool_shard", "pool_predictions",
                     "cluster_assignments", "selected_corpus"]


def test_a_hand_added_bad_partition_fails_clearly_and_writes_nothing(tmp_path: Path, small_pool):
    """Dagster accepts any dynamic partition key (only a few control characters are refused), so each asset
    partitioned by pool shard validates its key before building a path: a key added by hand fails the asset with a
    message naming it, and nothing is written anywhere outside the storage root (nor inside it). Each asset runs
    once through Dagster; every key is also tried on every asset's body directly (the same code, without the cost
    of a run)."""
    from groupmates_assets.definitions import defs as code_location
    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.resources import PlatformResource

    store = tmp_path / "root" / "store"
    platform = PlatformResource(storage_root=str(store), pool_dir=str(small_pool["pool"]))
    assets = {a.key.path[-1]: a for a in code_location.assets if isinstance(a, dg.AssetsDefinition)}
    defs = dg.Definitions(assets=list(assets.values()), resources={"platform": platform},
                          jobs=[dg.define_asset_job(asset, selection=[asset], partitions_def=pool_shards)
                                for asset in POOL_SHARD_ASSETS])
    keys = ["../escape", "/abs-escape", "sub/dir", "a b"]
    before = _files_outside(tmp_path, (tmp_path / "dagster",))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(pool_shards.name, keys)
        for asset in POOL_SHARD_ASSETS:
            assert assets[asset].partitions_def == pool_shards
            result = defs.resolve_job_def(asset).execute_in_process(partition_key=keys[0], instance=instance,
                                                                     raise_on_error=False)
            assert not result.success
            message = _failure_text(result)
            assert "invalid shard key" in message and repr(keys[0]) in message, (asset, message)
            assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"], asset
            for key in keys:
                with pytest.raises(dg.Failure, match=re.escape(repr(key))) as raised:
                    assets[asset](dg.build_asset_context(partition_key=key, instance=instance), platform=platform)
                assert isinstance(raised.value.__cause__, shard_io.InvalidShardKeyError)
                assert not raised.value.allow_retries, "no retry is spent on a key that cannot become valid"
    assert _files_outside(tmp_path, (tmp_path / "dagster",)) == before
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))


def test_static_partition_keys_cannot_be_forged(tmp_path: Path):
    """Oracle blocks, cluster ranges and selection methods are static: Dagster refuses any other key before the
    asset runs, every defined key is path-safe, and the key parsers reject look-alikes (non-ASCII digits, extra
    path parts) should they ever be reached."""
    from groupmates_assets.definitions import defs as code_location
    from groupmates_assets.defs import partitions
    from groupmates_assets.defs.resources import PlatformResource
    from groupmates_assets.lib.selection import range_bounds

    for keys in (partitions.oracle_block_keys(12), partitions.selection_range_keys(7), partitions.SELECTION_METHODS,
                 partitions.oracle_random_blocks.get_partition_keys(),
                 partitions.oracle_bootstrap_blocks.get_partition_keys(),
                 partitions.selection_ranges.get_partition_keys(), partitions.selection_methods.get_partition_keys()):
        for key in keys:
            assert shard_io.validate_shard_key(key) == key
    static = ["oracle_random", "oracle_bootstrap", "selected_documents", "tokenized_corpus", "pretrain_checkpoints",
              "evaluation"]
    platform = PlatformResource(storage_root=str(tmp_path / "store"))
    defs = dg.Definitions(assets=code_location.assets, resources={"platform": platform},
                          jobs=[dg.define_asset_job(asset, selection=[asset]) for asset in static])
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        for asset in static:
            with pytest.raises(dg.DagsterUnknownPartitionError, match="escape"):
                defs.resolve_job_def(asset).execute_in_process(partition_key="../escape", instance=instance)
    assert not (tmp_path / "store").exists() and not (tmp_path / "escape").exists()
    assert partitions.block_number("block-007") == 7 and range_bounds("clusters-001-of-004", 8) == (2, 4)
    for key in ["block-\u0660\u0661", "block-1/..", "block-..", "../block-1", "block-"]:
        with pytest.raises(ValueError, match="not an oracle block key"):
            partitions.block_number(key)
    for key in ["clusters-001-a/b-002", "clusters-001-/../x-002", "clusters-\u0661-of-002", "clusters-1-of-2/..",
                "../clusters-001-of-002"]:
        with pytest.raises(ValueError, match="not a cluster range key"):
            range_bounds(key, 8)


# ------------------------------------------------------------------------------- 4. the webserver on loopback

def _ui_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> list[str]:
    """The webserver command `groupmates ui ARGV` would start (recorded, not run)."""
    from groupmates_assets import local_dagster

    started: list[list[str]] = []
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setattr(local_dagster, "interrupt_on_stop_signals", lambda: None)  # pytest keeps its handlers
    monkeypatch.setattr(local_dagster.LocalDagster, "start", lambda self, timeout=300: started.append(
        self.webserver_command()))
    monkeypatch.setattr(local_dagster.LocalDagster, "wait", lambda self, poll=0.5: ("webserver", 0))
    cli.main(["ui", *argv])
    assert len(started) == 1
    args = started[0]
    assert os.path.basename(args[0]) == "dagster-webserver"
    return args


def test_ui_binds_to_loopback_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    args = _ui_command(monkeypatch, tmp_path, [])
    assert args[args.index("-h") + 1] == "127.0.0.1" and args[args.index("-p") + 1] == "3000"
    assert args.count("-h") == 1 and "0.0.0.0" not in args
    ui_recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert ui_recipe and "groupmates_assets.cli ui" in ui_recipe.group(1)
    assert "--host" not in ui_recipe.group(1)  # `make ui` keeps the loopback default


def test_ui_passes_an_explicit_host_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    args = _ui_command(monkeypatch, tmp_path, ["--host", "0.0.0.0", "--port", "8080"])
    assert args[args.index("-h") + 1] == "0.0.0.0" and args[args.index("-p") + 1] == "8080"
