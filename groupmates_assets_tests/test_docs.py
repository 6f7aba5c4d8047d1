"""The docs' claims point at real proofs: every test a document names exists, every benchmark it names is
registered, and every relative link resolves. A renamed or deleted test fails here instead of leaving a claim
without its proof."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "RELIABILITY.md", ROOT / "bench" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
TEST_REFERENCE = re.compile(r"(test_\w+\.py)(?:::(\w+))?")
BENCH_REFERENCE = re.compile(r"--only ([a-z]\w*)")  # NAME is a placeholder
RELATIVE_LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")


def defined_functions() -> dict[str, set[str]]:
    """Function names defined in each test module, by file name."""
    return {path.name: {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for path in (ROOT / "groupmates_assets_tests").glob("test_*.py")}


def broken_references(doc: Path, tests: dict[str, set[str]], bench_source: str) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    broken = [f"{doc.name}: {m.group(0)}" for m in TEST_REFERENCE.finditer(text)
              if m.group(1) not in tests or (m.group(2) and m.group(2) not in tests[m.group(1)])]
    broken += [f"{doc.name}: benchmark {m.group(1)}" for m in BENCH_REFERENCE.finditer(text)
               if f'"{m.group(1)}"' not in bench_source]
    broken += [f"{doc.name}: link {m.group(1)}" for m in RELATIVE_LINK.finditer(text)
               if "://" not in m.group(1) and not (doc.parent / m.group(1)).exists()]
    return broken


def test_every_test_benchmark_and_link_the_docs_name_exists():
    tests, bench_source = defined_functions(), (ROOT / "bench" / "run.py").read_text(encoding="utf-8")
    broken = [item for doc in DOCS for item in broken_references(doc, tests, bench_source)]
    assert not broken, "\n".join(broken)


def test_a_missing_test_benchmark_or_link_is_reported(tmp_path):
    """The checker itself can fail: each kind of dangling reference is reported."""
    doc = tmp_path / "claims.md"
    doc.write_text("Proven by test_layout.py::test_gone, `bench.run --only nothing_here`, [x](missing.md).\n")
    broken = broken_references(doc, defined_functions(), "")
    assert [item.split(": ", 1)[1] for item in broken] == [
        "test_layout.py::test_gone", "benchmark nothing_here", "link missing.md"]
