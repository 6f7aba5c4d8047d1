"""Resources shared by every stage: where artifacts live, where the raw pool is, which profile runs."""


import os

import dagster as dg
import fsspec

from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import Profile, get_profile

EMBEDDED_POOL_DIR = "embedded_pool"


def default_home() -> str:
    """Project-local working folder (gitignored); GROUPMATES_HOME moves it."""
    return os.path.abspath(os.environ.get("GROUPMATES_HOME", ".groupmates"))


class PlatformResource(dg.ConfigurableResource):
    """Storage root, raw pool location and scale profile.

    ``storage_root`` is a local folder or an fsspec URL (``s3://bucket/prefix``); ``pool_dir`` is where raw
    shard files are discovered (empty: the embedded default pool inside the storage root).
    """

    storage_root: str
    pool_dir: str = ""
    profile: str = "demo"

    def storage(self) -> Storage:
        return Storage(self.storage_root)

    def settings(self) -> Profile:
        return get_profile(self.profile)

    def pool_location(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, root path) of the raw pool shards."""
        if self.pool_dir:
            fs, path = fsspec.core.url_to_fs(self.pool_dir)
            return fs, (os.path.abspath(path) if _is_local(fs) else path)
        storage = self.storage()
        return storage.fs, storage.path(f"{EMBEDDED_POOL_DIR}/shards")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else protocol)


def platform_from_env() -> PlatformResource:
    """The resource as configured by environment variables, with project-local defaults."""
    return PlatformResource(
        storage_root=os.environ.get("GROUPMATES_STORAGE_ROOT", os.path.join(default_home(), "storage")),
        pool_dir=os.environ.get("GROUPMATES_POOL_DIR", ""),
        profile=os.environ.get("GROUPMATES_PROFILE", "demo"),
    )
