"""Print the code-location image's requirements, one per line: pyproject.toml's runtime dependencies plus the
variant's faiss build, the ``cpu`` extra's faiss-cpu or, for ``cuda``, the ``gpu`` extra's GPU faiss (one faiss
module, never both builds: they are extras, not dependencies).
The Dockerfile installs them with requirements.lock as constraints, so every version is the lock's.

    python3 docker/image_requirements.py cpu|cuda [pyproject.toml]
"""

import sys
import tomllib

VARIANTS = ("cpu", "cuda")
EXTRA_OF_VARIANT = {"cpu": "cpu", "cuda": "gpu"}


def requirements(variant: str, pyproject: dict) -> list[str]:
    if variant not in VARIANTS:
        raise SystemExit(f"VARIANT must be one of {', '.join(VARIANTS)}, got {variant!r}")
    project = pyproject["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"][EXTRA_OF_VARIANT[variant]])


if __name__ == "__main__":
    path = sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml"
    with open(path, "rb") as handle:
        print("\n".join(requirements(sys.argv[1], tomllib.load(handle))))
