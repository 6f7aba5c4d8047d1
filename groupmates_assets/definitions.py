"""The groupmates-assets code location: every module under defs/, found the way `dg` finds it, with the resources
and executor of this deployment."""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

import groupmates_assets.defs as defs_folder
from groupmates_assets.defs.deployment import executor_for
from groupmates_assets.defs.resources import platform_from_env, s3_from_env

DEFS_DIR = Path(defs_folder.__file__).resolve().parent
PROJECT_ROOT = DEFS_DIR.parent.parent


def build_definitions() -> dg.Definitions:
    """Assets, checks, jobs, sensors and schedules declared at module level anywhere under defs/ (a new stage folder
    needs no registration), bound to resources read from the environment at this call."""
    # The tree from the module, not from [tool.dg] (load_from_defs_folder): the installed image has no pyproject.toml.
    # Built at the defs folder, not the root: the root adds a catalogue of every installed component type to the
    # repository metadata (about 0.1 s at each load), and this project declares no components.
    tree = dg.ComponentTree.from_module(defs_module=defs_folder, project_root=PROJECT_ROOT)
    with warnings.catch_warnings():  # as load_from_defs_folder does: the plain-module loader is marked preview
        warnings.filterwarnings("ignore", message="Function `load_definitions_from_module", category=dg.PreviewWarning)
        discovered = tree.build_defs(DEFS_DIR)
    deployment = dg.Definitions(
        resources={
            "platform": platform_from_env(),
            "s3": s3_from_env(),  # dagster-aws S3Resource (boto3) for users' own ops; same endpoint/region as platform
        },
        executor=executor_for(),
    )
    return dg.Definitions.merge(discovered, deployment)


defs = build_definitions()
