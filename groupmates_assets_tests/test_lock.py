"""The lock files: complete (build tools included), in step with pyproject.toml and with what is installed, one faiss
build per variant, the CUDA libraries of PyPI's torch build pinned, and the Makefile installing them that way."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
FAISS = ("faiss-cpu", "faiss-gpu-cu12")


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: not an exact pin: {line!r}"
            assert _name(name) not in out, f"{path.name}: {name} pinned twice"
            out[_name(name)] = version
    return out


LOCK, CUDA, GPU = (pins(REPO / name) for name in ("requirements.lock", "requirements-cuda.lock",
                                                   "requirements-gpu.lock"))
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(entries: list[str]) -> dict[str, str]:
    found = {}
    for entry in entries:
        req = Requirement(entry)
        (spec,) = req.specifier  # every top-level requirement is one exact pin
        assert spec.operator == "==", entry
        found[_name(req.name)] = spec.version
    return found


def test_every_top_level_pin_is_in_the_lock_at_its_version():
    project = PROJECT["project"]
    top = _requirements([d for d in project["dependencies"] if "==" in d])
    top |= _requirements(project["optional-dependencies"]["dev"] + project["optional-dependencies"]["cpu"])
    assert {name: LOCK.get(name) for name in top} == top


def test_the_build_tools_are_pinned_for_the_no_build_isolation_install():
    (requirement,) = PROJECT["build-system"]["requires"]
    req = Requirement(requirement)
    assert _name(req.name) in LOCK and LOCK[_name(req.name)] in req.specifier
    assert PROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    # setuptools >= 70.1 builds wheels itself: the `wheel` package is not needed
    assert LOCK["setuptools"] in SpecifierSet(">=70.1")
    makefile = (REPO / "Makefile").read_text()
    assert "--no-build-isolation -e ." in makefile


def test_faiss_is_one_build_per_variant_never_both():
    project = PROJECT["project"]
    assert not [d for d in project["dependencies"] if _name(Requirement(d).name).startswith("faiss")]
    extras = {name: _requirements(project["optional-dependencies"][name]) for name in ("cpu", "gpu")}
    assert [n for n in extras["cpu"] if n.startswith("faiss")] == ["faiss-cpu"]
    assert [n for n in extras["gpu"] if n.startswith("faiss")] == ["faiss-gpu-cu12"]
    assert [n for n in LOCK if n.startswith("faiss")] == ["faiss-cpu"]
    assert [n for n in GPU if n.startswith("faiss")] == ["faiss-gpu-cu12"]
    assert GPU["faiss-gpu-cu12"] == extras["gpu"]["faiss-gpu-cu12"]
    makefile = (REPO / "Makefile").read_text()
    assert "pip uninstall --quiet -y faiss-cpu && $(PY) -m pip install --quiet --no-deps -r requirements-gpu.lock" in (
        makefile)


def test_the_cuda_libraries_are_pinned_apart_and_applied_as_constraints():
    assert CUDA and all(n.startswith(("nvidia-", "cuda-", "triton")) for n in CUDA), CUDA
    assert not set(CUDA) & set(LOCK) and not set(CUDA) & set(GPU)
    assert all(n.startswith("faiss-") or (n.startswith("nvidia-") and n.endswith("-cu12")) for n in GPU), GPU
    assert "-r requirements.lock -c requirements-cuda.lock" in (REPO / "Makefile").read_text()


def test_the_environment_is_the_lock():
    """What this venv holds is what the lock says (torch's local version label, +cpu, aside)."""
    installed = {_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {name: (version, installed.get(name)) for name, version in LOCK.items()
              if installed.get(name, "").split("+")[0] != version}
    assert not differ, differ


def test_test_artifacts_are_ignored():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert {".hypothesis/", ".pytest_cache/", ".groupmates/"} <= set(ignored)
