"""The compose deployment, built and run as a user runs it: images from scripts/build_images.sh (no registry), the
stack up with podman-compose, the whole graph on the `ci` profile through the deployed daemon, and a crash of the
code location, the daemon and the running runs' containers in the middle of it.

One test, in order: build; `up` until every health check passes; the embedded pool built by a backfill launched
through the deployed webserver's GraphQL API and its shards registered by the deployed `pool_shard_sensor`; the
whole graph as one asset backfill (the UI's "Materialize all"); at an oracle step, SIGKILL to the code-location
container, the daemon container and every run container, then both services started again; the backfill
completes, the killed runs having been resumed or failed and retried by Dagster's run monitoring and run retries;
every asset partition materialized exactly once (PostgreSQL's event log); the selected corpus and the report in
the S3 bucket, with no duplicate document; the lineage of `selected_corpus` rendered by headless Chromium from
the deployed webserver; every container stopping within a few seconds; everything torn down.

Figures (build, up to healthy, backfill, recovery, stop times) are printed and written to the test's tmp dir as
timings.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from groupmates_assets import demo
from groupmates_assets import local_dagster as services
from groupmates_assets.testing.browser import render_pages
from groupmates_assets.testing.compose_stack import (
    POOL_SHARDS,
    RUNS_AT_ONCE,
    SERVICES,
    ComposeStack,
    missing_tools,
    register_embedded_pool,
    wait_backfill,
    whole_graph,
)

pytestmark = pytest.mark.deploy

KILL_AT = "oracle_random"  # a resumable step in the middle of the graph, in the gpu pool
STOP_SECONDS = 5  # the most a container may take to stop: PID 1 forwards the signal
BACKFILL_TIMEOUT = 2400
UPSTREAM = ["filtered_pool_shard", "selected_documents", "selected_fasttext", "selected_mates", "selected_random"]

CHECK_BUCKET = """
import json
from groupmates_assets.defs.resources import platform_from_env
from groupmates_assets.lib import corpus, layout
storage = platform_from_env().storage()
methods = {}
for path in sorted(storage.fs.glob(storage.root + "/" + layout.SELECTED_CORPUS_DIR + "/*/*.jsonl.zst")):
    method = path.rsplit("/", 2)[-2]
    ids = [doc_id for doc_id, _ in corpus.read_selected_shard(storage.fs.cat_file(path), path)]
    entry = methods.setdefault(method, {"shards": 0, "documents": 0, "duplicates": 0, "ids": set()})
    entry["shards"] += 1
    entry["documents"] += len(ids)
    entry["duplicates"] += len(ids) - len(set(ids)) + len(entry["ids"].intersection(ids))
    entry["ids"].update(ids)
report = storage.read_bytes(layout.REPORT_DIR + "/selection_report.md").decode()
print(json.dumps({"root": storage.root, "protocol": storage.fs.protocol, "report_head": report[:400],
                  "report_json": sorted(storage.read_json(layout.REPORT_DIR + "/report.json")),
                  "methods": {m: {k: v for k, v in e.items() if k != "ids"} for m, e in methods.items()}}))
"""


class Crash:
    """SIGKILL to the code location, the daemon and every run container once a run of KILL_AT has been running a
    few seconds; both services are started again at once. Remembers the runs it killed and when."""

    def __init__(self, stack: ComposeStack, ui: services.Webserver, backfill_id: str):
        self.stack, self.ui, self.backfill_id = stack, ui, backfill_id
        self.killed_runs: list[dict] = []
        self.at: float | None = None
        self.restarted_at: float | None = None

    def __call__(self, state: dict) -> None:
        if self.at is not None:
            return
        runs = services.backfill_runs(self.ui, self.backfill_id)
        target = [r for r in runs if r["status"] == "STARTED" and KILL_AT in r["assets"] and r["start"]
                  and time.time() - r["start"] > 5]
        if not target:
            return
        self.at = time.monotonic()
        self.stack.kill(self.stack.container("code-location"), self.stack.container("daemon"))
        killed = self.stack.kill_run_containers()
        self.stack.start("code-location", "daemon")
        self.restarted_at = time.monotonic()
        # The runs whose worker died: their container was killed while they were still STARTED (a run that
        # finished between the listing and the kill is SUCCESS, and run monitoring rightly leaves it alone).
        runs = services.backfill_runs(self.ui, self.backfill_id)
        self.killed_runs = [r for r in runs if r["status"] == "STARTED"
                            and r["tags"].get("docker/container_id") in killed]
        assert any(KILL_AT in r["assets"] for r in self.killed_runs), (killed, target, runs)


def _events(stack: ComposeStack, run_id: str, condition: str, order: str = "id") -> list[dict]:
    """A run's event-log entries (as Dagster serialised them) that satisfy an SQL ``condition``."""
    rows = stack.psql(f"SELECT event FROM event_logs WHERE run_id = '{run_id}' AND {condition} ORDER BY {order}")
    return [json.loads(row[0]) for row in rows]


def _run_monitoring_messages(stack: ComposeStack, run_id: str) -> list[str]:
    """What run monitoring said of a run: "Detected run worker status ..., Resuming run" (an engine event) or
    "... Marking run as failed" (the run's failure event)."""
    events = _events(stack, run_id, "event LIKE '%Detected run worker status%'")
    messages = [e.get("user_message") or (e.get("dagster_event") or {}).get("message") or "" for e in events]
    return [m.splitlines()[0] for m in messages if m.startswith("Detected run worker status")]


def _failures(stack: ComposeStack, ui: services.Webserver, backfill_id: str) -> list[str]:
    """Each failed run of the backfill: its assets and its first step (else run) failure's message, from
    PostgreSQL's event log, so that a failed backfill says why."""
    found = []
    for run in services.backfill_runs(ui, backfill_id):
        if run["status"] != "FAILURE":
            continue
        # STEP_FAILURE sorts before RUN_FAILURE: the step's error when there is one, else the run's.
        events = _events(stack, run["id"], "dagster_event_type IN ('STEP_FAILURE', 'RUN_FAILURE')",
                         order="dagster_event_type DESC, id")
        dagster_event = (events[0] if events else {}).get("dagster_event") or {}
        chain = [(dagster_event.get("event_specific_data") or {}).get("error")]
        while chain[-1]:  # "Exceeded max_retries" wraps the step's own error: the chain, innermost last
            chain.append(chain[-1].get("cause") or chain[-1].get("context"))
        errors = chain[:-1]
        lines = [dagster_event.get("message") or "?"]
        lines += [f"{e.get('cls_name')}: {e.get('message', '').strip()}" for e in errors]
        lines += ["".join(errors[-1].get("stack") or [])[-2500:]] if errors else []
        found.append(f"{run['assets']} (run {run['id'][:8]}): " + "\n".join(lines))
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    missing = missing_tools()
    assert not missing, f"install {missing} with scripts/deploy_tools.sh (make test-deploy does)"
    stack = ComposeStack(tmp_path_factory.mktemp("deploy"), profile="ci")
    try:
        stack.build()
        stack.start_engine_api()
        stack.up()
        yield stack
    finally:
        stack.down()
        (stack.work / "timings.json").write_text(json.dumps(stack.timings, indent=2))
        print("deployment timings:", json.dumps(stack.timings))


def test_the_whole_graph_through_the_deployed_stack_survives_a_crash(stack: ComposeStack):
    ui = stack.webserver()
    ui.wait_until_loaded(300)
    services.set_pool_limit(ui, "gpu", RUNS_AT_ONCE)  # no GPU: the pool only orders CPU steps, as in the demo
    started = time.monotonic()
    shards = register_embedded_pool(ui)
    stack.timings["pool_s"] = round(time.monotonic() - started, 1)

    assets = whole_graph(ui)
    assert assets == demo.target_assets({n["key"]: n for n in services.asset_nodes(ui)}, None)  # the demo's
    backfill_id = services.launch_backfill(ui, assets, "deployment test: whole graph", {})
    crash = Crash(stack, ui, backfill_id)
    started = time.monotonic()
    state = wait_backfill(ui, backfill_id, BACKFILL_TIMEOUT, on_poll=crash)
    stack.timings["graph_s"] = round(time.monotonic() - started, 1)
    assert state["status"] == "COMPLETED_SUCCESS", "\n".join(
        [f"backfill {state['status']}; failed runs:", *_failures(stack, ui, backfill_id), stack.logs("daemon")])
    incomplete = {a: s for a, s in state["assets"].items() if s["materialized"] != s["targeted"]}
    assert not incomplete and set(state["assets"]) == set(assets), incomplete
    assert state["assets"]["filtered_pool_shard"]["targeted"] == len(shards) == POOL_SHARDS

    # The crash happened mid-run, and Dagster's run monitoring resumed or failed each killed run (then run
    # retries re-executed it): every killed run's work ended in a successful run.
    assert crash.at is not None, f"no run of {KILL_AT} was running long enough to be killed"
    stack.timings["crash_after_s"] = round(crash.at - started, 1)
    stack.timings["completed_after_crash_s"] = round(time.monotonic() - crash.at, 1)
    runs = {r["id"]: r for r in services.backfill_runs(ui, backfill_id)}
    outcomes = {}
    for killed in crash.killed_runs:
        final = runs[killed["id"]]
        retries = [r for r in runs.values() if r["tags"].get("dagster/parent_run_id") == killed["id"]]
        messages = _run_monitoring_messages(stack, killed["id"])
        assert messages, f"run monitoring said nothing about killed run {killed['id']}"
        assert final["status"] == "SUCCESS" or any(r["status"] == "SUCCESS" for r in retries), (final, retries)
        outcomes[killed["id"]] = {"assets": killed["assets"], "status": final["status"],
                                  "retries": [r["status"] for r in retries], "monitoring": messages}
        if final["status"] == "SUCCESS":
            stack.timings.setdefault("resumed_run_s", []).append(round(final["end"] - final["start"], 1))
    stack.timings["killed_runs"] = outcomes
    print("killed runs:", json.dumps(outcomes, indent=2))

    # Nothing duplicated: one materialization per asset partition in the event log; the runs, in PostgreSQL.
    duplicated = stack.psql("SELECT asset_key, partition, count(*) FROM event_logs WHERE dagster_event_type = "
                            "'ASSET_MATERIALIZATION' GROUP BY asset_key, partition HAVING count(*) > 1")
    assert not duplicated, duplicated
    statuses = dict(stack.psql("SELECT status, count(*) FROM runs r JOIN run_tags t ON t.run_id = r.run_id WHERE "
                               f"t.key = 'dagster/backfill' AND t.value = '{backfill_id}' GROUP BY status"))
    assert int(statuses.get("SUCCESS", 0)) >= len(assets) // 4 and set(statuses) <= {"SUCCESS", "FAILURE"}, statuses
    stack.timings["runs"] = statuses

    # The selected corpus and the report in the bucket, read by the project's own readers in the code location.
    bucket = json.loads(stack.exec("code-location", "python", "-c", CHECK_BUCKET).strip().splitlines()[-1])
    assert "s3" in bucket["protocol"] and bucket["root"].removeprefix("s3://") == "groupmates/storage", bucket
    assert {"group_mates", "mates", "fasttext", "random"} <= set(bucket["methods"]), bucket
    for method, found in bucket["methods"].items():
        assert found["shards"] == POOL_SHARDS and found["documents"] > 0 and found["duplicates"] == 0, method
    assert bucket["report_head"].startswith("#") and "methods" in bucket["report_json"], bucket

    # The lineage of selected_corpus, rendered by headless Chromium from the deployed webserver.
    text = render_pages(ui.url, {"lineage": "/assets/selected_corpus?view=lineage&lineageScope=upstream",
                                 "asset": "/assets/selected_corpus"}, stack.work / "screenshots",
                        ready={"lineage": r"\bselection\b", "asset": "Code location"})
    missing = [a for a in UPSTREAM[1:] if a not in text["lineage"]]
    assert not missing and "selection" in text["lineage"], f"missing from the lineage graph: {missing}"
    assert "Code location groupmates_assets" in text["asset"], text["asset"][:2000]

    # PID 1 of every container forwards the stop signal: each stops within a few seconds.
    for service in ("webserver", "daemon", "code-location", "s3", "postgres"):
        before = time.monotonic()
        stack.podman("stop", "--time", "20", stack.container(service))
        stack.timings[f"stop_{service}_s"] = round(time.monotonic() - before, 1)
    slow = {s: stack.timings[f"stop_{s}_s"] for s in SERVICES if stack.timings[f"stop_{s}_s"] > STOP_SECONDS}
    assert not slow, f"stopped only after SIGKILL or close to it: {slow}"
    Path(stack.work / "backfill.json").write_text(json.dumps(state, indent=2))
