"""The whole graph on the `ci` profile through the compose deployment against the same through `groupmates demo`,
back to back on one machine, with the deployment's own figures: image build from a warm wheelhouse, `up` to
healthy, and how long each container takes to stop.

The deployment (groupmates_assets/testing/compose_stack.py): images from scripts/build_images.sh, the stack up
with podman-compose, the embedded pool built by a backfill and registered by the deployed sensor, then the whole
graph as one asset backfill through the deployed webserver's GraphQL API, each run in a container of its own. The
local demo: `GROUPMATES_PROFILE=ci python -m groupmates_assets.cli demo` on a fresh GROUPMATES_HOME (it builds the
pool and runs the same backfill through its own daemon). One pass each (``--repeats`` does not apply); needs
podman (scripts/deploy_tools.sh), so it runs on request: ``python -m bench.run --only deploy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import Figure

MAIN_BACKFILL = "follow it in the UI"  # the demo's line once its main backfill is submitted


def _stack(tmp: Path) -> dict[str, float]:
    from groupmates_assets import local_dagster as services
    from groupmates_assets.testing.compose_stack import (
        RUNS_AT_ONCE,
        ComposeStack,
        register_embedded_pool,
        wait_backfill,
        whole_graph,
    )

    stack = ComposeStack(tmp / "stack", profile="ci")
    try:
        stack.build()
        stack.start_engine_api()
        stack.up()
        ui = stack.webserver()
        ui.wait_until_loaded(300)
        services.set_pool_limit(ui, "gpu", RUNS_AT_ONCE)
        started = time.monotonic()
        register_embedded_pool(ui)
        pool = time.monotonic() - started
        backfill_id = services.launch_backfill(ui, whole_graph(ui), "bench: whole graph", {})
        launched = time.monotonic()
        state = wait_backfill(ui, backfill_id, 3600)
        graph = time.monotonic() - launched
        if state["status"] != "COMPLETED_SUCCESS":
            raise RuntimeError(f"the stack's backfill ended {state['status']}")
        for service in ("webserver", "daemon", "code-location", "s3", "postgres"):
            before = time.monotonic()
            stack.podman("stop", "--time", "20", stack.container(service))
            stack.timings[f"stop_{service}_s"] = round(time.monotonic() - before, 1)
    finally:
        stack.down()
    return {**stack.timings, "pool_s": pool, "graph_s": graph, "total_s": time.monotonic() - started}


def _demo(tmp: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_"))}
    env.update(GROUPMATES_HOME=str(tmp / "demo"), GROUPMATES_PROFILE="ci")
    started = time.monotonic()
    demo = subprocess.Popen([sys.executable, "-m", "groupmates_assets.cli", "demo"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    launched = None
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if launched is None and MAIN_BACKFILL in line:
            launched = time.monotonic()
    if demo.wait() != 0 or launched is None:
        raise RuntimeError("the demo failed:\n" + "".join(lines[-40:]))
    ended = time.monotonic()
    return {"pool_s": launched - started, "graph_s": ended - launched, "total_s": ended - started}


def run(repeats: int = 1) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="groupmates-bench-deploy-") as tmp:
        stack = _stack(Path(tmp))
        demo = _demo(Path(tmp))
    stops = {k: v for k, v in stack.items() if k.startswith("stop_")}
    return [
        Figure("deploy_build_warm", stack["build_s"], "s", "scripts/build_images.sh, warm wheelhouse and layers"),
        Figure("deploy_up_to_healthy", stack["up_to_healthy_s"], "s", "podman-compose up -d until every check passes"),
        Figure("deploy_pool", stack["pool_s"], "s", "embedded pool backfill + the deployed sensor's registration"),
        Figure("deploy_whole_graph", stack["graph_s"], "s", "ci profile, one backfill, one container per run"),
        Figure("demo_pool", demo["pool_s"], "s", "groupmates demo from its start to the main backfill"),
        Figure("demo_whole_graph", demo["graph_s"], "s", "ci profile, the same backfill, runs in local processes"),
        Figure("deploy_vs_demo_whole_graph", stack["graph_s"] / demo["graph_s"], "x", "wall time ratio"),
        Figure("deploy_slowest_stop", max(stops.values()), "s",
               ", ".join(f"{k[5:-2]} {v:.1f}" for k, v in stops.items())),
    ]
