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
import time
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
    from groupmates_assets.demo import INTERRUPTED, run_demo

    code = run_demo(args, prepare_dagster_home())
    if code == INTERRUPTED:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End an interrupted command at once: its services are stopped and its line printed, and the interpreter's
    teardown of the modules it loaded (torch, Dagster) would add seconds on a busy machine."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


UI_STOP_GRACE_SECONDS = 5  # after Ctrl-C or SIGTERM: the services' own shutdown, then SIGKILL


def ui(args: argparse.Namespace) -> int:
    """The Dagster UI (webserver on loopback unless --host says otherwise) and the daemon, over the instance the demo
    wrote to, as `dagster dev` runs them; their logs go to the instance's service_logs, so that Ctrl-C or SIGTERM
    ends the command within seconds with one line."""
    from groupmates_assets import local_dagster as services

    home = prepare_dagster_home()
    services.interrupt_on_stop_signals()
    dagster = services.LocalDagster(home, port=args.port, host=args.host)
    try:
        say(f"starting the Dagster UI at http://{args.host}:{args.port} and the daemon (logs in {dagster.log_dir}; "
            "Ctrl-C stops them)")
        dagster.start()
        say(f"the UI is ready: http://{args.host}:{args.port}")
        name, code = dagster.wait()
        say(f"ERROR: the Dagster {name} exited with code {code}; see {dagster.log_dir / (name + '.log')}")
        return 1
    except KeyboardInterrupt as interrupt:
        services.ignore_stop_signals()
        started = time.monotonic()
        dagster.stop(grace=UI_STOP_GRACE_SECONDS)
        say(f"the UI and the daemon stopped ({interrupt or 'SIGINT'}) in {time.monotonic() - started:.0f} s")
        exit_now(services.INTERRUPTED)
    except services.DagsterServiceError as exc:
        say(f"ERROR: {exc}")
        return 1
    finally:
        dagster.stop(grace=UI_STOP_GRACE_SECONDS)
    return 0


def say(message: str) -> None:
    print(f"[groupmates] {message}", flush=True)


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
