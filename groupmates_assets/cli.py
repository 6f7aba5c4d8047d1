"""`groupmates`: run the main job on the embedded default pool, or open the UI on the same instance.

``groupmates demo`` materializes every stage as one backfill run by the daemon of a persistent Dagster instance
(under ``$GROUPMATES_HOME/dagster_home``), so ``groupmates ui`` afterwards shows the backfill, its runs,
materializations, checks and metadata.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "dagster.yaml"
STAGE_ORDER = ["filter", "oracle", "influence", "selection", "pretrain", "report"]  # groupmates_assets.demo's stages


def prepare_dagster_home() -> str:
    """Point DAGSTER_HOME at the project-local instance and give it the project's dagster.yaml."""
    from groupmates_assets.defs.resources import default_home

    home = os.environ.get("DAGSTER_HOME") or os.path.join(default_home(), "dagster_home")
    os.makedirs(home, exist_ok=True)
    os.environ["DAGSTER_HOME"] = home
    target = Path(home) / "dagster.yaml"
    if REPO_DAGSTER_YAML.exists() and (not target.exists() or target.read_bytes() != REPO_DAGSTER_YAML.read_bytes()):
        shutil.copyfile(REPO_DAGSTER_YAML, target)  # keep the instance in step with the project's settings
    return home


def demo(args: argparse.Namespace) -> int:
    """The main job: one backfill of the whole graph through the instance's daemon (see groupmates_assets.demo)."""
    from groupmates_assets.settings import active_profile_name

    try:
        active_profile_name()  # the one profile partitions, GPU requests and the resource all use
    except ValueError as exc:
        print(f"[groupmates] {exc}", file=sys.stderr, flush=True)
        return 2
    from groupmates_assets.demo import run_demo

    return run_demo(args, prepare_dagster_home())


def ui(args: argparse.Namespace) -> int:
    """Start `dagster dev` on loopback against the same instance the demo wrote to."""
    prepare_dagster_home()
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [os.path.join(os.path.dirname(sys.executable), "dagster"), "dev", "-w", str(workspace),
               "-h", args.host, "-p", str(args.port)]
    print(f"[groupmates] starting the Dagster UI at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(command[0], command)
    return 0


def provenance(args: argparse.Namespace) -> int:
    """Print the chain of upstream assets behind a selected dataset, from the instance the demo wrote to."""
    home = prepare_dagster_home()
    from groupmates_assets.provenance import command

    return command(args, home=home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groupmates", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="run the main job end to end on the embedded default pool")
    run_demo.add_argument("--rebuild-pool", action="store_true", help="rebuild the embedded pool first")
    run_demo.add_argument("--until", choices=STAGE_ORDER, default="report",
                          help="last stage to run (default: report, the whole graph)")
    run_demo.add_argument("--new-backfill", action="store_true",
                          help="submit a new backfill of every asset even if the last one for this pool and profile "
                          "succeeded (by default a rerun resumes it: only what is missing or failed runs again)")
    run_demo.set_defaults(func=demo)
    run_ui = commands.add_parser("ui", help="open the Dagster UI on the project instance")
    run_ui.add_argument("--host", default="127.0.0.1")
    run_ui.add_argument("--port", type=int, default=3000)
    run_ui.set_defaults(func=ui)
    trace = commands.add_parser("provenance", help="the upstream assets, runs, versions and parameters behind a "
                                "selected dataset")
    trace.add_argument("--asset", default="selected_corpus", help="asset key (default: selected_corpus)")
    trace.add_argument("--partition", help="one partition of the asset (default: all of them; the method's own "
                       "partition for tokenized_corpus, pretrain_checkpoints and evaluation)")
    trace.add_argument("--method", default="group_mates",
                       help="selection method whose lineage to show: group_mates (default), group_mates_weighted, "
                       "group_mates_global, random, mates, fasttext")
    trace.add_argument("--all-methods", action="store_true", help="keep every method's selection in the chain")
    trace.add_argument("--json", action="store_true", help="print JSON instead of the table")
    trace.set_defaults(func=provenance)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
