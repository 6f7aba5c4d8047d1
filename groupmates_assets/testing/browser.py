"""Pages of a Dagster webserver rendered by headless Chromium (Debian's `chromium`, installed by
scripts/install_test_services.sh): a screenshot of each and the visible text of its rendered DOM. Used by the UI
test against `groupmates ui` and by the deployment test against the compose stack's webserver."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

CHROMIUM_ENV = "GROUPMATES_CHROMIUM"
# Debian's package and binary are `chromium`; Ubuntu's `chromium-browser`; Google's builds install google-chrome.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def chromium_binary() -> str | None:
    """$GROUPMATES_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    if os.environ.get(CHROMIUM_ENV):
        return shutil.which(os.environ[CHROMIUM_ENV])
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


CHROMIUM = chromium_binary()
MIN_SCREENSHOT_BYTES = 10_000  # a blank page's PNG is smaller


class BrowserError(RuntimeError):
    """Chromium is missing, failed on a page, or left no screenshot (the message names the page)."""


def render_pages(base_url: str, paths: dict[str, str], out_dir: Path, timeout: float = 60,
                 ready: dict[str, str] | None = None, attempts: int = 3) -> dict[str, str]:
    """Every page of ``paths`` (name -> path under ``base_url``) rendered at once, each by its own Chromium with a
    15 s virtual-time budget; its screenshot lands in ``out_dir/<name>.png``. Returns the visible text per name.

    ``ready`` (name -> regular expression) says what a page shows once it has rendered (the asset graph lays
    itself out after its data arrives, which on a busy machine can outlast the budget, leaving the loading
    spinner): a page whose text lacks it is rendered again with twice the budget, up to ``attempts`` times in
    all, and what the last attempt showed is returned (the caller's assertion then says what is missing)."""
    if CHROMIUM is None:
        raise BrowserError(f"no Chromium: none of {', '.join(CHROMIUM_NAMES)} is on PATH and ${CHROMIUM_ENV} is unset "
                           "(Debian/Ubuntu package chromium or chromium-browser: scripts/install_test_services.sh)")
    out_dir.mkdir(parents=True, exist_ok=True)
    ready = ready or {}
    texts: dict[str, str] = {}
    pending, budget_ms = dict(paths), 15_000
    for _ in range(max(1, attempts)):
        texts.update(_render_once(base_url, pending, out_dir, budget_ms, timeout * budget_ms / 15_000))
        pending = {name: path for name, path in pending.items()
                   if name in ready and not re.search(ready[name], texts[name])}
        if not pending:
            break
        budget_ms *= 2
    return texts


def _render_once(base_url: str, paths: dict[str, str], out_dir: Path, budget_ms: int,
                 timeout: float) -> dict[str, str]:
    browsers = {}
    for name, path in paths.items():
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                   "--disable-dev-shm-usage", f"--user-data-dir={out_dir / f'chromium-{name}'}",
                   f"--virtual-time-budget={budget_ms}", "--window-size=1400,900",
                   f"--screenshot={out_dir / name}.png", "--dump-dom", base_url.rstrip("/") + path]
        browsers[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True)
    texts = {}
    try:
        for name, browser in browsers.items():
            dom, errors = browser.communicate(timeout=timeout)
            if browser.returncode != 0:
                raise BrowserError(f"chromium failed on {paths[name]}: {errors[-2000:]}")
            png = out_dir / f"{name}.png"
            if not png.exists() or png.stat().st_size < MIN_SCREENSHOT_BYTES:
                raise BrowserError(f"no screenshot of {paths[name]}")
            texts[name] = visible_text(dom)
    finally:
        for browser in browsers.values():
            if browser.poll() is None:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
    return texts


def visible_text(dom: str) -> str:
    """The visible text of a DOM dump (tags, scripts and styles removed)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
