"""The composition of the selected corpora (lib.composition): documents by cluster and source joined by doc_id, the
shards added up, and the report's figures on a hand-made pool."""

import json
import math

import pyarrow as pa
import pytest

from groupmates_assets.lib import composition

pytestmark = pytest.mark.unit


def _kept(ids, sources):
    return pa.table({"doc_id": ids, "fields": [json.dumps({"source": s}) if s else None for s in sources]})


def test_a_shard_is_counted_by_doc_id_per_method_cluster_and_source():
    kept = _kept(["a", "b", "c", "d"], ["wiki", "web", "wiki", None])
    assignments = pa.table({"doc_id": ["d", "c", "b", "a"], "cluster": pa.array([2, 1, 1, 0], pa.int64())})
    selections = {"m": pa.table({"doc_id": ["c", "a", "x"], "shard": ["s", "s", "other"]}),  # x: another shard
                  "empty": pa.table({"doc_id": pa.array([], pa.string()), "shard": pa.array([], pa.string())})}
    table = composition.shard_composition(kept, selections, "s", assignments, "source")
    rows = sorted(zip(*(table.column(c).to_pylist() for c in ("method", "cluster", "source", "documents")),
                      strict=True))
    assert rows == [("m", 0, "wiki", 1), ("m", 1, "wiki", 1), ("pool", 0, "wiki", 1), ("pool", 1, "web", 1),
                    ("pool", 1, "wiki", 1), ("pool", 2, composition.NO_SOURCE, 1)]
    assert composition.record_sources(['{"source": "a"}'], None) == [composition.NO_SOURCE]
    again = composition.total_composition([table, table])
    assert again.column("documents").to_pylist() == [2] * 6 and again.schema == composition.SCHEMA


def _table(rows):
    names = ("method", "cluster", "source", "documents")
    return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}, schema=composition.SCHEMA)


def test_summary_shares_spread_over_clusters_and_disagreements():
    # pool: cluster 0 = 6 wiki, cluster 1 = 4 code; "all_wiki" keeps cluster 0 whole, "even" half of each
    table = _table([("pool", 0, "wiki", 6), ("pool", 1, "code", 4), ("all_wiki", 0, "wiki", 5),
                    ("even", 0, "wiki", 3), ("even", 1, "code", 2)])
    summary = composition.summarize(table, ["all_wiki", "even"])
    wiki, even = summary["methods"]["all_wiki"], summary["methods"]["even"]
    assert summary["pool"] == {"documents": 10, "by_source": {"code": 4, "wiki": 6}, "clusters": 2}
    assert wiki["by_source"] == {"code": 0, "wiki": 5} and wiki["clusters_dropped"] == 1
    assert wiki["effective_clusters"] == pytest.approx(1.0) and wiki["distance_from_pool"] == pytest.approx(0.4)
    assert even["clusters_dropped"] == 0 and even["distance_from_pool"] == pytest.approx(0.0)
    assert even["effective_clusters"] == pytest.approx(math.exp(-0.6 * math.log(0.6) - 0.4 * math.log(0.4)))
    assert wiki["clusters_kept_90"] == 0 and composition.summarize(
        _table([("pool", 0, "wiki", 10), ("m", 0, "wiki", 9)]), ["m"])["methods"]["m"]["clusters_kept_90"] == 1
    first = summary["clusters"][0]
    assert first["top_source"] in ("wiki", "code") and set(first["kept"]) == {"all_wiki", "even"}
    markdown = "\n".join(composition.to_markdown(summary))
    assert "| wiki | 60.0% | 100.0% | 60.0% |" in markdown and "| code | 40.0% | 0.0% | 40.0% |" in markdown
    assert "| all_wiki | 5 | 1 | 1 | 0 | 1.0 | 0.400 |" in markdown
