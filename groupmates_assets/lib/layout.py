"""Where every artifact lives in the storage root, and the readers and writers of the "current" pointers.

Stages hand their outputs to each other as files, so these paths are the contract between them: one stage writes
here, the next reads from here, and no stage imports another stage's module to learn where. A versioned output
lives under a fingerprint of its inputs; its stage's pointer (``<dir>/current.json``, :func:`write_pointer`),
written last, names the version that consumers read (one typed reader per pointer). A missing pointer or input is
a :class:`MissingArtifactError` that names the asset to materialize. No Dagster here: the stages' modules turn
these errors into step failures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from groupmates_assets.lib.shards import ShardFile, validate_shard_key
from groupmates_assets.lib.storage import ArtifactInfo, Storage

# pool
EMBEDDED_POOL_DIR = "embedded_pool"
EMBEDDED_SHARDS_DIR = f"{EMBEDDED_POOL_DIR}/shards"
EMBEDDED_PROVENANCE = f"{EMBEDDED_POOL_DIR}/provenance.json"
EMBEDDED_POSITIVES = f"{EMBEDDED_POOL_DIR}/positives/wikipedia-summaries-hq.jsonl.zst"  # positives, not in the pool
SHARD_MANIFEST = "pool/shards/{key}/manifest.json"

# quality
CLASSIFIER_DIR = "quality/classifier"
CURRENT_CLASSIFIER = f"{CLASSIFIER_DIR}/current.json"
FILTERED_POOL_DIR = "filtered_pool"
FILTERED_DIR = f"{FILTERED_POOL_DIR}/{{key}}"
FILTERED_MANIFEST = f"{FILTERED_POOL_DIR}/_manifest.json"

# tokenize, lm
TOKENIZED_POOL_DIR = "tokenized_pool"
TOKENIZED_DIR = f"{TOKENIZED_POOL_DIR}/{{key}}"
PROBE_CHECKPOINT_DIR = "lm/probe_checkpoint"
PROBE_CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json")  # the state file marks it whole

# oracle, influence
REFERENCE_FILE = "oracle/reference_set.jsonl"
PROBE_POOL_DIR = "oracle/probe_pool"
ORACLE_RANDOM_DIR = "oracle/random"
ORACLE_BOOTSTRAP_DIR = "oracle/bootstrap"
INFLUENCE_MODELS_DIR = "influence/models"
BOOTSTRAP_DIR = "influence/bootstrap"
INFLUENCE_REPORT = "influence/report.json"
ASSET_OF_KIND = {"init": "influence_model_init", "final": "influence_model_final",
                 "individual": "individual_influence_model"}

# selection, corpus, pretrain, evaluation, report
PREDICTIONS_DIR = "selection/predictions"
CLUSTERS_DIR = "selection/clusters"
SELECTIONS_DIR = "selection/methods"
SELECTED_CORPUS_DIR = "selected_corpus"
SELECTED_COMPOSITION = f"{SELECTED_CORPUS_DIR}/_composition/{{key}}.parquet"  # documents by method, cluster, source
TOKENIZED_CORPUS_DIR = "tokenized_corpus"
PRETRAIN_DIR = "pretrain"
EVALUATION_DIR = "evaluation"
REPORT_DIR = "report"
CAUSAL_DIR = "causal/selection_influence"  # <fingerprint>/actual-<set>.json, result.json; current.json


class MissingArtifactError(FileNotFoundError):
    """An input that another asset writes is not in storage; the message names the asset to materialize."""


def fingerprint(**parts) -> str:
    """12 hex digits identifying a set of inputs; outputs live under it, so changed inputs never mix with old."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pointer_path(directory: str) -> str:
    return f"{directory}/current.json"


def read_pointer(storage: Storage, directory: str, missing: str) -> dict[str, Any]:
    """The pointer under ``directory``; ``missing`` is the error's message when there is none."""
    if not storage.exists(pointer_path(directory)):
        raise MissingArtifactError(missing)
    return storage.read_json(pointer_path(directory))


def write_pointer(storage: Storage, directory: str, pointer: dict[str, Any]) -> ArtifactInfo:
    """Point consumers at a complete version: call it last, after every file of that version is written."""
    return storage.write_json(pointer_path(directory), pointer)


def require_files(storage: Storage, paths: dict[str, str], asset_name: str) -> None:
    """Fail naming the shards (keys of ``paths``) whose file from ``asset_name`` is missing."""
    missing = [key for key, path in paths.items() if not storage.exists(path)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MissingArtifactError(f"{asset_name} is missing for shards {shown}; materialize those partitions first")


# -- pool --------------------------------------------------------------------------------------------------------
def registered_shard(storage: Storage, key: str) -> ShardFile | None:
    """The shard file as ``pool_shard`` registered it, or None when that partition was never materialized."""
    manifest_path = SHARD_MANIFEST.format(key=validate_shard_key(key))
    if not storage.exists(manifest_path):
        return None
    m = storage.read_json(manifest_path)
    return ShardFile(m["key"], m["path"], m["relative_path"], m["format"], m["bytes"])


def registered_shards(storage: Storage, keys: Iterable[str]) -> list[ShardFile]:
    """Shards among ``keys`` whose ``pool_shard`` partition has been materialized, in key order. The keys are
    given (the pool's partitions now), not listed from storage: storage keeps the manifests of shards of any pool
    this instance saw before."""
    shards = (registered_shard(storage, key) for key in sorted(keys))
    return [shard for shard in shards if shard is not None]


# -- quality -----------------------------------------------------------------------------------------------------
def current_classifier(storage: Storage) -> dict[str, Any]:
    return read_pointer(storage, CLASSIFIER_DIR, "no quality classifier yet: materialize quality_classifier first")


def current_classifier_version(storage: Storage) -> str | None:
    """The version the next filter run will use, or None before the first classifier."""
    return storage.read_json(CURRENT_CLASSIFIER)["version"] if storage.exists(CURRENT_CLASSIFIER) else None


def filtered_shards(storage: Storage) -> list[str]:
    """Shard keys of the filtered pool, from the manifest filtered_pool_summary writes."""
    if not storage.exists(FILTERED_MANIFEST):
        raise MissingArtifactError("no filtered pool manifest; materialize filtered_pool_summary first")
    return sorted(s["key"] for s in storage.read_json(FILTERED_MANIFEST)["shards"])


# -- oracle and influence ----------------------------------------------------------------------------------------
def current_oracle(storage: Storage, root_dir: str, asset_name: str) -> dict[str, Any]:
    """The pointer of the oracle labels under ``root_dir`` (``ORACLE_RANDOM_DIR`` or ``ORACLE_BOOTSTRAP_DIR``)."""
    return read_pointer(storage, root_dir,
                        f"no {asset_name} labels under {storage.url(root_dir)}; materialize {asset_name} first")


def oracle_pointers(storage: Storage) -> dict[str, dict[str, Any]]:
    """The pointers of the oracle labels collected so far, by policy (``random``, ``bootstrap``)."""
    roots = {"random": ORACLE_RANDOM_DIR, "bootstrap": ORACLE_BOOTSTRAP_DIR}
    return {policy: storage.read_json(pointer_path(root)) for policy, root in roots.items()
            if storage.exists(pointer_path(root))}


def model_dir(kind: str) -> str:
    """Where the influence models of ``kind`` (a key of ``ASSET_OF_KIND``) and their pointer live."""
    return f"{INFLUENCE_MODELS_DIR}/{kind}"


def current_model(storage: Storage, kind: str) -> dict[str, Any]:
    """The pointer of the current influence model of ``kind``: fingerprint, path, alpha, tau."""
    return read_pointer(storage, model_dir(kind), f"no {kind} influence model under "
                        f"{storage.url(INFLUENCE_MODELS_DIR)}; materialize {ASSET_OF_KIND[kind]} first")


def current_bootstrap(storage: Storage) -> dict[str, Any]:
    return read_pointer(storage, BOOTSTRAP_DIR,
                        "no bootstrap trajectories yet; materialize bootstrap_trajectories first")


# -- selection and what follows ----------------------------------------------------------------------------------
def current_clusters(storage: Storage) -> dict[str, Any]:
    return read_pointer(storage, CLUSTERS_DIR, "no clusters yet; materialize cluster_centroids first")


def corpus_dir(method: str) -> str:
    """Where ``method``'s tokenized corpora and their pointer live."""
    return f"{TOKENIZED_CORPUS_DIR}/{method}"


def current_corpus(storage: Storage, method: str) -> dict[str, Any]:
    """The pointer of ``method``'s current tokenized corpus: its fingerprint and folder."""
    return read_pointer(storage, corpus_dir(method),
                        f"no tokenized corpus for {method}; materialize tokenized_corpus first")


def current_causal(storage: Storage) -> dict[str, Any]:
    """The pointer of the current causal check: its fingerprint and result file."""
    return read_pointer(storage, CAUSAL_DIR, "no causal check yet; materialize selection_influence first")


def pretrain_dir(method: str) -> str:
    """Where ``method``'s pretraining runs and their pointer live."""
    return f"{PRETRAIN_DIR}/{method}"


def current_pretrain(storage: Storage, method: str) -> dict[str, Any]:
    """The pointer of ``method``'s current pretraining runs: fingerprint, stages and every seed's checkpoints."""
    return read_pointer(storage, pretrain_dir(method),
                        f"no pretrained checkpoint for {method}; materialize pretrain_checkpoints first")
