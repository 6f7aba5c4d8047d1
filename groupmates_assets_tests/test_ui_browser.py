"""The Dagster UI, started as users start it (`groupmates ui`, which `make ui` runs), rendered by headless Chromium:
the project's code location loads from workspace.yaml, the asset graph shows the pipeline's stages, and the selected
corpus page shows what it was built from. Everything the command starts (the code server, the webserver and the
daemon) must listen on loopback only, and Ctrl-C or SIGTERM must end it all within 10 s with one line.

Screenshots go to the test's tmp dir, and are copied to $GROUPMATES_SCREENSHOT_DIR when it is set.
"""

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from groupmates_assets import cli
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.pool.assets import pool_shard
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.testing.browser import CHROMIUM, CHROMIUM_ENV, CHROMIUM_NAMES, render_pages
from groupmates_assets_tests.conftest import service_missing

pytestmark = pytest.mark.integration

REPO = Path(cli.__file__).resolve().parent.parent
STAGE_GROUPS = ["pool", "quality", "tokenize", "lm", "oracle", "influence", "selection", "corpus", "pretrain",
                "evaluation", "report"]
SHARDS = ["crawl-a", "crawl-b"]
UPSTREAM = ["filtered_pool_shard", "selected_documents", "selected_fasttext", "selected_mates", "selected_random"]
LOCATION_QUERY = ("{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus "
                  "locationOrLoadError { __typename ... on PythonError { message } } } } } }")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, data: bytes | None = None, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _wait_until_loaded(base: str, server: subprocess.Popen, log: Path, deadline: float) -> None:
    """/server_info answers once the HTTP server is up; the code location loads after that (the definitions import
    torch), so also wait for the workspace to report it LOADED."""
    body = json.dumps({"query": LOCATION_QUERY}).encode()
    last = "no answer"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"groupmates ui exited with {server.returncode}:\n{server.stdout.read()[-3000:]}\n"
                        f"{log.read_text()[-3000:] if log.exists() else ''}")
        try:
            json.loads(_get(f"{base}/server_info"))
            entries = json.loads(_get(f"{base}/graphql", body))["data"]["workspaceOrError"]["locationEntries"]
        except (OSError, ValueError, KeyError) as error:
            last = repr(error)
        else:
            last = repr(entries)
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                errors = [e for e in entries if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"]
                assert not errors, f"code location failed to load: {errors}"
                return
        time.sleep(0.5)
    pytest.fail(f"the UI did not load the code location in time ({last}):\n{log.read_text()[-3000:]}")


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (what `groupmates ui` started, in whatever session or group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # after "pid (comm)": state, ppid
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def _listening_addresses(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of ``pids`` holds, from /proc."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))  # /proc prints 32-bit words host-endian
            listener = ipaddress.ip_address(raw)
            listener = getattr(listener, "ipv4_mapped", None) or listener  # gRPC's 127.0.0.1 on a dual-stack socket
            found.append((str(listener), int(port, 16)))
    return found


def _outward_address() -> str | None:
    """This machine's non-loopback address, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """dagster-webserver over workspace.yaml and a test instance where two pool shards are registered; stopped
    (its whole process group) at the end."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    if cli.REPO_DAGSTER_YAML.exists():
        shutil.copyfile(cli.REPO_DAGSTER_YAML, home / "dagster.yaml")  # as `groupmates ui` does
    pool = root / "pool"
    pool.mkdir()
    for key in SHARDS:
        (pool / f"{key}.jsonl").write_text(json.dumps({"text": f"a document of {key}", "url": key}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_"))}
    env.update(DAGSTER_HOME=str(home), GROUPMATES_HOME=str(root), GROUPMATES_STORAGE_ROOT=str(root / "store"),
               GROUPMATES_POOL_DIR=str(pool), GROUPMATES_PROFILE="ci", DAGSTER_DISABLE_TELEMETRY="1")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(pool_shards.name, SHARDS)
        platform = PlatformResource(storage_root=str(root / "store"), pool_dir=str(pool))  # pool_shard: any profile
        for key in SHARDS:
            assert dg.materialize([pool_shard], partition_key=key, instance=instance,
                                  resources={"platform": platform}).success

    with _started_ui(root, env) as ui:
        yield ui


@contextlib.contextmanager
def _started_ui(root: Path, env: dict[str, str]):
    """`groupmates ui --port P` (the `make ui` command) in a session of its own, once the code location loaded; at
    the end whatever is still running of it is killed."""
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "groupmates_assets.cli", "ui", "--port", str(port)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_loaded(base, ui, Path(env["DAGSTER_HOME"]) / "service_logs" / "webserver.log",
                           time.monotonic() + 120)
        said = []
        while not said or "the UI is ready" not in said[-1]:  # printed once the daemon started too
            said.append(ui.stdout.readline())
            assert said[-1], "".join(said)
        yield {"base": base, "port": port, "process": ui, "root": root, "said": said}
    finally:
        for pid in [ui.pid, *_descendants(ui.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ui.wait(timeout=10)


PAGES = {  # screenshot name -> UI path
    "asset-graph": "/asset-groups",
    "selected-corpus": "/assets/selected_corpus",
    "selected-corpus-lineage": "/assets/selected_corpus?view=lineage&lineageScope=upstream",
}


PAGE_READY = {  # what each page shows once rendered (a page still loading is rendered again, with more time)
    "asset-graph": r"\bselection\b",
    "selected-corpus": "Upstream assets",
    "selected-corpus-lineage": r"filtered_po\S*_shard",
}


@pytest.fixture(scope="module")
def pages(ui) -> dict[str, str]:
    """Every page of PAGES rendered by headless Chromium at once: a screenshot each, and the visible text of the
    rendered DOM. Screenshots stay in the module's tmp dir (copied to $GROUPMATES_SCREENSHOT_DIR when set)."""
    if CHROMIUM is None:
        service_missing(f"no Chromium: none of {', '.join(CHROMIUM_NAMES)} is on PATH and ${CHROMIUM_ENV} is unset "
                        "(Debian/Ubuntu package chromium or chromium-browser: scripts/install_test_services.sh)")
    out = ui["root"] / "screenshots"
    texts = render_pages(ui["base"], PAGES, out, ready=PAGE_READY)
    if os.environ.get("GROUPMATES_SCREENSHOT_DIR"):
        target = Path(os.environ["GROUPMATES_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        for png in out.glob("*.png"):
            shutil.copyfile(png, target / png.name)
    return texts


def test_webserver_listens_on_loopback_only(ui):
    listening = _listening_addresses(_descendants(ui["process"].pid))
    assert ("127.0.0.1", ui["port"]) in listening
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in listening), listening
    outward = _outward_address()
    if outward is not None:
        with pytest.raises(OSError), socket.create_connection((outward, ui["port"]), timeout=2):
            pass


def test_asset_graph_shows_the_project_stages(pages):
    text = pages["asset-graph"]
    assert "Global asset lineage" in text, text[:3000]
    missing = [g for g in STAGE_GROUPS if not re.search(rf"\b{g}\b", text)]
    assert not missing, f"stage groups missing from the asset graph: {missing}\n{text[:3000]}"


def test_selected_corpus_page_shows_its_upstream_lineage(pages):
    text = pages["selected-corpus"]
    assert "The selected documents of a shard for every method" in text, text[:3000]
    assert "Code location groupmates_assets" in text  # the location workspace.yaml loads
    upstream, _, downstream = text.partition("Upstream assets")[2].partition("Downstream assets")
    missing = [a for a in UPSTREAM if a not in upstream]
    assert not missing, f"upstream assets missing from the selected_corpus page: {missing}\n{text[:3000]}"
    assert "tokenized_corpus" in downstream and "tokenized_corpus" not in upstream


def test_selected_corpus_lineage_graph_shows_its_inputs_by_stage(pages):
    text = pages["selected-corpus-lineage"]
    assert re.search(r"\bquality\b", text) and re.search(r"\bselection\b", text), text[:3000]
    assert re.search(r"filtered_po\S*_shard", text)  # the graph shortens long names
    missing = [a for a in UPSTREAM[1:] if a not in text]
    assert not missing, f"upstream assets missing from the lineage graph: {missing}\n{text[:3000]}"


def _assert_stops_within_10_s(ui: dict, signum: int) -> None:
    """The signal ends `groupmates ui` within 10 s, exit status 130, with one line after the signal and no
    traceback, and nothing it started is left running."""
    process: subprocess.Popen = ui["process"]
    started = _descendants(process.pid)
    assert len(started) >= 2, started  # the webserver and the daemon, at least
    sent = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout=30)
    took = time.monotonic() - sent
    after_ready = process.stdout.read().splitlines()
    assert code == 130 and took < 10, (code, took, after_ready)
    assert len(after_ready) == 1 and f"stopped ({signal.Signals(signum).name})" in after_ready[0], after_ready
    assert not any("Traceback" in line for line in ui["said"])
    time.sleep(0.5)
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"], started


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_sigterm_stops_the_ui_within_10_s_with_one_line(tmp_path):
    home = tmp_path / "dagster_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_"))}
    env.update(DAGSTER_HOME=str(home), GROUPMATES_HOME=str(tmp_path), GROUPMATES_PROFILE="ci",
               DAGSTER_DISABLE_TELEMETRY="1")
    with _started_ui(tmp_path, env) as ui:
        _assert_stops_within_10_s(ui, signal.SIGTERM)


def test_ctrl_c_stops_the_ui_within_10_s_with_one_line(ui, pages):
    """Last in this file: it ends the module's UI (after the pages were rendered)."""
    _assert_stops_within_10_s(ui, signal.SIGINT)


def test_a_page_still_loading_is_rendered_again_with_a_longer_budget(tmp_path, monkeypatch):
    """A stand-in Chromium that shows the spinner until its virtual-time budget reaches 60 s: the page is rendered
    three times (15, 30, 60 s) and its final text returned; a page with no ready marker is rendered once."""
    from groupmates_assets.testing import browser

    calls = tmp_path / "calls"
    fake = tmp_path / "chromium"
    fake.write_text(f"""#!{sys.executable}
import sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
open({str(calls)!r}, "a").write(sys.argv[-1] + " " + args["virtual-time-budget"] + "\\n")
open(args["screenshot"], "wb").write(b"x" * 20000)
print("<p>graph: selection</p>" if int(args["virtual-time-budget"]) >= 60000 else "<p>loading</p>")
""")
    fake.chmod(0o755)
    monkeypatch.setattr(browser, "CHROMIUM", str(fake))
    texts = browser.render_pages("http://127.0.0.1:9", {"graph": "/g", "other": "/o"}, tmp_path / "out",
                                 ready={"graph": r"\bselection\b"})
    assert "selection" in texts["graph"] and "loading" in texts["other"], texts
    assert sorted(calls.read_text().split("\n")[:-1]) == [
        "http://127.0.0.1:9/g 15000", "http://127.0.0.1:9/g 30000", "http://127.0.0.1:9/g 60000",
        "http://127.0.0.1:9/o 15000"]
