"""The Dagster UI, as `groupmates ui` serves it, rendered by headless Chromium: the project's code location loads
from workspace.yaml, the asset graph shows the pipeline's stages, and the selected corpus page shows what it was
built from. The webserver (and the code server it spawns) must listen on loopback only.

Screenshots go to the test's tmp dir, and are copied to $GROUPMATES_SCREENSHOT_DIR when it is set.
"""

import contextlib
import html
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

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`, installed by "
    "scripts/install_test_services.sh)")]

REPO = Path(cli.__file__).resolve().parent.parent
WEBSERVER = Path(sys.executable).with_name("dagster-webserver")
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
            pytest.fail(f"dagster-webserver exited with {server.returncode}:\n{log.read_text()[-3000:]}")
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


def _group_pids(pgid: int) -> list[int]:
    """Processes of the webserver's process group (it and the code server it spawned)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp
            pids.append(int(stat.parent.name))
    return pids


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
            found.append((str(ipaddress.ip_address(raw)), int(port, 16)))
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

    port = _free_port()
    log = root / "webserver.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(WEBSERVER), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_loaded(base, server, log, time.monotonic() + 90)
        yield {"base": base, "port": port, "pgid": server.pid, "root": root}
    finally:
        _stop_group(server)


def _stop_group(leader: subprocess.Popen) -> None:
    """SIGTERM the process group (webserver and code server), SIGKILL whatever is left after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=15)
    while _group_pids(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait(timeout=5)


PAGES = {  # screenshot name -> UI path
    "asset-graph": "/asset-groups",
    "selected-corpus": "/assets/selected_corpus",
    "selected-corpus-lineage": "/assets/selected_corpus?view=lineage&lineageScope=upstream",
}


@pytest.fixture(scope="module")
def pages(ui) -> dict[str, str]:
    """Every page of PAGES rendered by headless Chromium at once: a screenshot each, and the visible text of the
    rendered DOM. Screenshots stay in the module's tmp dir (copied to $GROUPMATES_SCREENSHOT_DIR when set)."""
    out = ui["root"] / "screenshots"
    out.mkdir()
    browsers = {}
    for name, path in PAGES.items():
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                   "--disable-dev-shm-usage", f"--user-data-dir={ui['root'] / f'chromium-{name}'}",
                   "--virtual-time-budget=15000", "--window-size=1400,900", f"--screenshot={out / name}.png",
                   "--dump-dom", ui["base"] + path]
        browsers[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)
    texts = {}
    try:
        for name, browser in browsers.items():
            dom, errors = browser.communicate(timeout=60)
            assert browser.returncode == 0, f"chromium failed on {PAGES[name]}: {errors[-2000:]}"
            png = out / f"{name}.png"
            assert png.exists() and png.stat().st_size > 10_000, f"no screenshot of {PAGES[name]}"
            texts[name] = _text(dom)
    finally:
        for browser in browsers.values():
            if browser.poll() is None:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
    if os.environ.get("GROUPMATES_SCREENSHOT_DIR"):
        target = Path(os.environ["GROUPMATES_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        for png in out.glob("*.png"):
            shutil.copyfile(png, target / png.name)
    return texts


def _text(dom: str) -> str:
    """The visible text of a DOM dump (tags, scripts and styles removed)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_webserver_listens_on_loopback_only(ui):
    listening = _listening_addresses(_group_pids(ui["pgid"]))
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
