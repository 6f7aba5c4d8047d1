"""Test support shared by the tests and the benchmarks (``bench/``), shipped with the package as Dagster ships
``dagster._core.test_utils``: throwaway servers on loopback (`s3_server`, `postgres_server`), hand-written
documents (`documents`), the pool-to-selection path on any storage root (`pool_to_selection`), concurrent runs on
one instance (`concurrent_runs`) and the asset-spec dump behind the snapshot test (`asset_specs`).

Nothing here imports pytest or the test package; the pytest fixtures that wrap these live in
``groupmates_assets_tests/conftest.py``.
"""
