"""The benchmarks stand on the package alone: every ``bench/`` module imports without the test package (or
pytest), taking the servers and helpers it shares with the tests from ``groupmates_assets.testing``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = ("groupmates_assets_tests", "pytest", "_pytest")
IMPORT_ALL = """
    import importlib, json, pathlib, sys
    names = sorted("bench." + p.stem for p in pathlib.Path("bench").glob("*.py") if p.stem != "__init__")
    for name in names:
        importlib.import_module(name)
    print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def test_every_bench_module_imports_without_the_test_package():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(IMPORT_ALL)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "bench.bench_s3" in result["imported"] and "bench.run" in result["imported"]
    leaked = [name for name in result["loaded"] if name.split(".")[0] in TEST_ONLY]
    assert not leaked, f"bench/ imports {leaked}: take shared helpers from groupmates_assets.testing"


def test_bench_run_help_starts():
    done = subprocess.run([sys.executable, "-m", "bench.run", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--only" in done.stdout, done.stderr[-3000:]


def test_scale_benchmark_pool_has_the_real_layout(tmp_path):
    """bench/bench_scale.py's synthetic pool is what the stages before selection write: a manifest naming every
    shard, kept documents whose doc_id ends with their text's hash, and unit-norm float16 predictions keyed by the
    same doc_ids under the models' fingerprint."""
    import numpy as np

    from bench import bench_scale
    from groupmates_assets.lib import layout
    from groupmates_assets.lib import selection as sel
    from groupmates_assets.lib.shards import text_hash
    from groupmates_assets.lib.storage import Storage

    pool = bench_scale.write_pool(tmp_path, 3_000, 4)
    storage = Storage(str(tmp_path))
    assert layout.filtered_shards(storage) == pool["keys"] == [f"web-{i:04d}" for i in range(4)]
    models = layout.fingerprint(final=layout.current_model(storage, "final")["fingerprint"],
                                individual=layout.current_model(storage, "individual")["fingerprint"])
    total = 0
    for key in pool["keys"]:
        kept = storage.read_parquet(f"filtered_pool/{key}/kept.parquet")
        predictions = storage.read_parquet(f"selection/predictions/{models}/{key}.parquet")
        assert predictions.column("doc_id").equals(kept.column("doc_id"))
        hashes = [text_hash(t) for t in kept.column("text").to_pylist()]
        assert predictions.column("text_hash").to_pylist() == hashes
        assert all(d.endswith(h) for d, h in zip(kept.column("doc_id").to_pylist(), hashes, strict=True))
        assert np.allclose(np.linalg.norm(sel.embeddings(predictions), axis=1), 1.0, atol=1e-2)
        total += kept.num_rows
    assert total == 3_000
    assert bench_scale.profile_settings(2_000_000)["cluster_ranges"] == 40  # 2,000 clusters, 50 per range
    assert bench_scale.shards_for(2_000_000) == 256 and bench_scale.shards_for(250_000) == 64


def test_centroid_search_benchmark_measures_agreement_against_the_exact_search():
    """bench/bench_centroid_search.py: the exact row is the reference (agreement 1, speed-up 1), and an approximate
    quantizer's agreement is the share of documents it gives the exact nearest centroid, so a quantizer that
    searches almost nothing agrees less."""
    import numpy as np

    from bench import bench_centroid_search as bench

    rows = bench.compare(1_024, 3_000, "planted")
    assert rows[0]["method"] == "exact (IndexFlatIP)"
    assert rows[0]["agreement"] == 1.0 and rows[0]["speedup"] == 1.0
    assert all(0.0 <= row["agreement"] <= 1.0 and row["seconds"] > 0 for row in rows)
    by_method = {row["method"]: row["agreement"] for row in rows}
    assert by_method["IVF 32 lists, nprobe 8"] < by_method["IVF 32 lists, nprobe 32"] == 1.0  # 32 of 32: every list
    for kind in bench.GEOMETRIES:
        centroids, documents = bench.geometry(256, 3_000, kind)
        assert centroids.shape == (256, bench.DIM) and documents.shape == (3_000, bench.DIM)
        assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
        assert np.allclose(np.linalg.norm(documents, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="unknown geometry"):
        bench.geometry(16, 10, "uniform")
