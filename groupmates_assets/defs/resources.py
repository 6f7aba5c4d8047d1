"""Resources shared by every stage: where artifacts live, where the raw pool is, which profile runs."""


import os

import dagster as dg
import fsspec
from dagster_aws.s3 import S3Resource

from groupmates_assets.lib.layout import EMBEDDED_SHARDS_DIR
from groupmates_assets.lib.storage import S3_ENDPOINT_ENV, S3_REGION_ENV, Storage, fs_options
from groupmates_assets.settings import PROFILE_ENV, Profile, active_profile_name, get_profile, with_thread_cap

THREADS_ENV = "GROUPMATES_TORCH_THREADS"  # cap on torch threads per step (the demo sets it for its workers)


def default_home() -> str:
    """Project-local working folder (gitignored); GROUPMATES_HOME moves it."""
    return os.path.abspath(os.environ.get("GROUPMATES_HOME", ".groupmates"))


class PlatformResource(dg.ConfigurableResource):
    """Storage root, raw pool location and scale profile.

    ``profile`` must be the profile the code location was loaded with (GROUPMATES_PROFILE, see
    ``settings.active_profile_name``; empty: that one): the partitions of the oracle, bootstrap and selection
    stages and the GPU requests were built from it when the definitions were imported, so a run config that
    names another profile is refused when the run starts rather than mixing two profiles in one storage root.

    ``storage_root`` is a local folder or an fsspec URL (``s3://bucket/prefix``); ``pool_dir`` is where raw
    shard files are discovered (empty: the embedded default pool inside the storage root). For ``s3://`` both
    use ``s3_endpoint_url`` (an S3-compatible server; empty: $GROUPMATES_S3_ENDPOINT_URL, else AWS or
    $AWS_ENDPOINT_URL) and ``s3_region``. Credentials are deliberately not fields: botocore's default chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance or pod role) supplies them, so no secret is
    ever part of a run's config, its logs or asset metadata.
    """

    storage_root: str
    pool_dir: str = ""
    profile: str = ""  # empty: the profile the code location was loaded with; anything else must equal it
    s3_endpoint_url: str = ""
    s3_region: str = ""
    torch_threads: int = 0  # > 0: at most this many torch threads per partitioned step (they run side by side); 0: the
    # profile's

    def fs_options(self, url: str) -> dict:
        """fsspec options for a URL of this platform (the storage root, the pool or a file beside them)."""
        return fs_options(url, _resolved(self.s3_endpoint_url), _resolved(self.s3_region))

    def storage(self) -> Storage:
        return Storage(self.storage_root, self.fs_options(self.storage_root))

    def settings(self, alone: bool = False) -> Profile:
        """The run's profile: the one the definitions were built with (``ValueError`` if ``profile`` names
        another), with the thread cap applied to steps that share the machine with others. ``alone``: the step is
        its stage's only run (an unpartitioned asset in a backfill) and keeps the profile's threads."""
        profile = get_profile(self.profile_name())
        return with_thread_cap(profile, self.torch_threads) if self.torch_threads > 0 and not alone else profile

    def profile_name(self) -> str:
        """``profile`` checked against the profile the code location was loaded with."""
        loaded, asked = active_profile_name(), _resolved(self.profile) or ""
        if asked and asked != loaded:
            get_profile(asked)  # an unknown name: the list of known profiles
            raise ValueError(
                f"this code location was loaded with profile {loaded!r} (partitions, GPU requests); the run asks "
                f"for profile {asked!r}: set {PROFILE_ENV}={asked} and reload the code location instead of "
                "overriding the resource")
        return loaded

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.profile_name()  # a run with another profile fails when it starts, before any step computes

    def pool_location(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, root path) of the raw pool shards."""
        if self.pool_dir:
            fs, path = fsspec.core.url_to_fs(self.pool_dir, **self.fs_options(self.pool_dir))
            return fs, (os.path.abspath(path) if _is_local(fs) else path)
        storage = self.storage()
        return storage.fs, storage.path(EMBEDDED_SHARDS_DIR)

    def pool_url(self, path: str) -> str:
        """A pool file's path as a user can paste it: unchanged when local, ``s3://bucket/key`` on S3 (fsspec
        paths carry no protocol); the pool filesystem opens either form."""
        fs, _ = self.pool_location()
        return path if _is_local(fs) or "://" in path else fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else protocol)


def _resolved(value: str) -> str:
    """A field's value also outside a run, where Dagster has not yet replaced an ``EnvVar`` by its value."""
    return (value.get_value() or "") if isinstance(value, dg.EnvVar) else value


def _from_env(name: str) -> dg.EnvVar | None:
    """``EnvVar(name)`` when the variable is set, so the UI shows where the value comes from; else None."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def platform_from_env() -> PlatformResource:
    """The resource as configured by environment variables, with project-local defaults."""
    return PlatformResource(
        storage_root=os.environ.get("GROUPMATES_STORAGE_ROOT", os.path.join(default_home(), "storage")),
        pool_dir=os.environ.get("GROUPMATES_POOL_DIR", ""),
        profile=active_profile_name(),
        s3_endpoint_url=_from_env(S3_ENDPOINT_ENV) or "",
        s3_region=_from_env(S3_REGION_ENV) or "",
        torch_threads=_thread_cap_from_env(),
    )


def _thread_cap_from_env() -> int:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"{THREADS_ENV} must be a whole number of threads, got {value!r}")
    return int(value)


def s3_from_env() -> S3Resource:
    """dagster-aws's boto3 resource for users' own ops, on the same endpoint and region as the platform.

    Credentials are left unset on purpose: boto3's default chain reads them from the environment (or ~/.aws,
    or a role) when a run starts, so they never appear in the definitions or the run config.
    """
    return S3Resource(endpoint_url=_from_env(S3_ENDPOINT_ENV), region_name=_from_env(S3_REGION_ENV))
