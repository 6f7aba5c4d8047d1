"""The storage layout and the module graph: stages import no other stage, lib/ imports no Dagster, and the
"current" pointers round-trip at the paths stored data already uses, with errors that name the asset to
materialize."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

from groupmates_assets.lib import layout
from groupmates_assets.lib.storage import Storage

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "groupmates_assets"
DEFS = PACKAGE / "defs"
STAGES = sorted(p.name for p in DEFS.iterdir() if (p / "__init__.py").exists())


def imported_modules(path: Path) -> set[str]:
    """Every module a file of the package imports."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> set[str]:
    """Every module ``source`` imports (function-local imports too), relative imports resolved from ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from defs import selection`
    return names


def test_the_stage_folders_are_the_known_stages():
    known = ["pool", "quality", "tokenize", "lm", "oracle", "influence", "selection", "corpus", "pretrain",
             "evaluation", "causal", "report"]
    assert sorted(known) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage: str):
    """A stage reaches other stages' outputs through lib/layout.py (paths, pointers), defs/shared.py and asset
    keys, never through their modules, so each stage can change without touching the others."""
    others = [f"groupmates_assets.defs.{other}" for other in STAGES if other != stage]
    for path in sorted((DEFS / stage).rglob("*.py")):
        crossing = sorted(name for name in imported_modules(path)
                          if any(name == other or name.startswith(f"{other}.") for other in others))
        assert not crossing, f"{path.relative_to(PACKAGE.parent)} imports {crossing}"


def test_lib_imports_no_dagster():
    """Algorithms and the layout are plain Python: they run and are tested without Dagster."""
    for path in sorted((PACKAGE / "lib").rglob("*.py")):
        dagster = sorted(name for name in imported_modules(path) if name.split(".")[0].startswith("dagster"))
        assert not dagster, f"{path.relative_to(PACKAGE.parent)} imports {dagster}"
        defs = sorted(name for name in imported_modules(path) if name.startswith("groupmates_assets.defs"))
        assert not defs, f"{path.relative_to(PACKAGE.parent)} imports {defs}"


def test_the_import_check_sees_every_form():
    source = ("import groupmates_assets.defs.pool.assets\nfrom groupmates_assets.defs import quality\n"
              "def f():\n    from ..selection import assets\n    from . import helpers\n")
    assert imports_in(source, "groupmates_assets.defs.corpus") >= {
        "groupmates_assets.defs.pool.assets", "groupmates_assets.defs.quality", "groupmates_assets.defs.selection",
        "groupmates_assets.defs.corpus.helpers"}


# -- pointers --------------------------------------------------------------------------------------------------
POINTERS: list[tuple[str, str, Callable[[Storage], dict], str]] = [
    # (directory written by write_pointer, the file it must be, the typed reader, what a missing one names)
    (layout.CLASSIFIER_DIR, "quality/classifier/current.json", layout.current_classifier,
     "no quality classifier yet: materialize quality_classifier first"),
    (layout.ORACLE_RANDOM_DIR, "oracle/random/current.json",
     lambda s: layout.current_oracle(s, layout.ORACLE_RANDOM_DIR, "oracle_random"), "materialize oracle_random first"),
    (layout.ORACLE_BOOTSTRAP_DIR, "oracle/bootstrap/current.json",
     lambda s: layout.current_oracle(s, layout.ORACLE_BOOTSTRAP_DIR, "oracle_bootstrap"),
     "materialize oracle_bootstrap first"),
    (layout.model_dir("final"), "influence/models/final/current.json", lambda s: layout.current_model(s, "final"),
     "materialize influence_model_final first"),
    (layout.model_dir("individual"), "influence/models/individual/current.json",
     lambda s: layout.current_model(s, "individual"), "materialize individual_influence_model first"),
    (layout.BOOTSTRAP_DIR, "influence/bootstrap/current.json", layout.current_bootstrap,
     "no bootstrap trajectories yet; materialize bootstrap_trajectories first"),
    (layout.CLUSTERS_DIR, "selection/clusters/current.json", layout.current_clusters,
     "no clusters yet; materialize cluster_centroids first"),
    (layout.corpus_dir("random"), "tokenized_corpus/random/current.json",
     lambda s: layout.current_corpus(s, "random"),
     "no tokenized corpus for random; materialize tokenized_corpus first"),
    (layout.CAUSAL_DIR, "causal/selection_influence/current.json", layout.current_causal,
     "no causal check yet; materialize selection_influence first"),
    (layout.pretrain_dir("mates"), "pretrain/mates/current.json", lambda s: layout.current_pretrain(s, "mates"),
     "no pretrained checkpoint for mates; materialize pretrain_checkpoints first"),
]


@pytest.mark.parametrize(("directory", "path", "read", "missing"), POINTERS, ids=[p[1] for p in POINTERS])
def test_pointer_round_trip(tmp_path, directory: str, path: str, read: Callable[[Storage], dict], missing: str):
    storage = Storage(str(tmp_path))
    with pytest.raises(layout.MissingArtifactError, match=missing):
        read(storage)
    pointer = {"fingerprint": "0123456789ab", "path": f"{directory}/0123456789ab", "alpha": 0.5}
    info = layout.write_pointer(storage, directory, pointer)
    assert info.path == storage.url(path)  # the file existing storage roots already hold
    assert (tmp_path / path).read_bytes() == b'{\n  "alpha": 0.5,\n  "fingerprint": "0123456789ab",\n  "path": "' + \
        f"{directory}/0123456789ab".encode() + b'"\n}\n'
    assert read(storage) == pointer


def test_a_missing_pointer_is_a_file_not_found_error(tmp_path):
    """Steps retry FileNotFoundError as before; the stages that must not retry wrap it in a PermanentFailure."""
    from groupmates_assets.defs.common import PermanentFailure, missing_is_permanent

    storage = Storage(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="materialize cluster_centroids first"):
        layout.current_clusters(storage)
    with pytest.raises(PermanentFailure) as failure, missing_is_permanent():
        layout.current_pretrain(storage, "random")
    assert failure.value.description == "no pretrained checkpoint for random; materialize pretrain_checkpoints first"
    assert failure.value.allow_retries is False


def test_classifier_version_and_oracle_pointers(tmp_path):
    storage = Storage(str(tmp_path))
    assert layout.current_classifier_version(storage) is None and layout.oracle_pointers(storage) == {}
    layout.write_pointer(storage, layout.CLASSIFIER_DIR, {"version": "abc", "model": "m"})
    layout.write_pointer(storage, layout.ORACLE_RANDOM_DIR, {"fingerprint": "f1"})
    assert layout.current_classifier_version(storage) == "abc"
    assert layout.oracle_pointers(storage) == {"random": {"fingerprint": "f1"}}


def test_filtered_shards_and_required_files(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(layout.MissingArtifactError, match="materialize filtered_pool_summary first"):
        layout.filtered_shards(storage)
    storage.write_json("filtered_pool/_manifest.json", {"shards": [{"key": "web-b"}, {"key": "web-a"}]})
    assert layout.filtered_shards(storage) == ["web-a", "web-b"]
    storage.write_bytes("a.bin", b"")
    paths = {"web-a": "a.bin", **{f"web-{i:02d}": f"missing-{i}" for i in range(12)}}
    with pytest.raises(FileNotFoundError, match=r"pool_predictions is missing for shards web-00, .*, web-09 and 2 "
                                                r"more; materialize those partitions first"):
        layout.require_files(storage, paths, "pool_predictions")
    layout.require_files(storage, {"web-a": "a.bin"}, "pool_predictions")


def test_registered_shards_come_from_the_pool_manifests(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_json("pool/shards/web-a/manifest.json", {"key": "web-a", "path": "/pool/web-a.jsonl",
                                                           "relative_path": "web-a.jsonl", "format": "jsonl",
                                                           "bytes": 10})
    assert layout.registered_shard(storage, "web-b") is None
    assert [s.path for s in layout.registered_shards(storage, ["web-b", "web-a"])] == ["/pool/web-a.jsonl"]


def test_fingerprints_name_the_same_folders_as_before():
    """Output folders are named by these digests: a change would orphan every stored artifact."""
    assert layout.fingerprint(method="random", seed=0, shards={"web-a": "ab"}) == "781c2cb6df39"
    assert layout.fingerprint(b=1, a=2) == layout.fingerprint(a=2, b=1)
