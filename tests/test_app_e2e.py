"""End to end: `streamlit run apps/explorer.py` on localhost, driven by headless Chromium (Playwright).

Loads the default model (the embedded smollm2-moe), runs each page, waits for its plotly charts,
applies an expert switch and sees the output change, and saves screenshots to artifacts/app/.
Skipped when Playwright or Chromium is missing (see README: the dev extra and `apt-get install chromium`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from steer.cli.app import APP_FILE as APP  # the explorer steer ships (steer.apps)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "app"
CHROMIUM = os.environ.get("STEER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LONG = 600_000  # ms: a loaded 2-core machine may build/load the MoE and generate slowly

pytestmark = [pytest.mark.slow, pytest.mark.requires("playwright", "streamlit")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set STEER_CHROMIUM)")
    port = _free_port()
    env = {**os.environ, "STEER_APP_MODEL": os.environ.get("STEER_APP_E2E_MODEL", "smollm2-moe"),
           "STEER_APP_THREADS": os.environ.get("STEER_APP_THREADS", "1")}  # CI and dev boxes are shared
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--server.maxUploadSize", "50"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}; see {SHOTS / 'streamlit.log'}")
        else:
            pytest.fail("streamlit did not come up in 2 minutes")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 2400})
        pg.set_default_timeout(LONG)
        pg.goto(server)
        # the sidebar caption appears once the default model is loaded
        pg.get_by_text("smollm2-moe", exact=False).first.wait_for()
        pg.locator("[data-testid='stSidebar']").get_by_text("16 experts").wait_for()
        yield pg
        pg.screenshot(path=str(SHOTS / "last.png"), full_page=True)  # where it stopped, if a test failed
        browser.close()


def _charts(pg, n: int) -> None:
    """Wait until at least n plotly charts have drawn (their SVG main layer exists)."""
    pg.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}", timeout=LONG)


def _idle(pg) -> None:
    """Wait for the script run to finish (Streamlit shows a running indicator meanwhile)."""
    pg.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"] button')", timeout=LONG)
    pg.wait_for_timeout(500)


def _goto(pg, title: str) -> None:
    _idle(pg)
    pg.locator("[data-testid='stSidebarNav']").get_by_text(title).click()
    pg.get_by_role("heading", name=title.split(" (")[0], exact=False).first.wait_for()


def _shot(pg, name: str) -> None:
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _click(pg, name: str) -> None:
    """Click a button once the current script run has finished (so runs do not overlap)."""
    _idle(pg)
    pg.get_by_role("button", name=name, exact=True).click()
    pg.wait_for_timeout(300)


def test_experts_page_profile_and_switch_changes_output(page):
    pg = page
    _click(pg, "Profile experts")
    _charts(pg, 3)  # a heatmap per class + the top-k bars
    _shot(pg, "experts_profile")
    pg.get_by_text("tokens were routed to layer").first.wait_for()  # steer.ftri.expert_tokens' table
    pg.get_by_role("heading", name="2. Tokens routed to an expert").scroll_into_view_if_needed()
    _shot(pg, "experts_tokens")
    _click(pg, "Generate baseline and switched")
    pg.get_by_text("routing changed for").wait_for()
    _idle(pg)
    _shot(pg, "experts_switch")
    assert pg.get_by_text("switched (changed)").count() >= 1, "switching the profile's top experts changed nothing"


def test_sinks_page_charts_and_act(page):
    pg = page
    _goto(pg, "Attention sinks (ACT)")
    _click(pg, "Detect sinks")
    _charts(pg, 3)
    _shot(pg, "sinks")
    _click(pg, "Generate without and with ACT")
    pg.get_by_text("attention rows").wait_for()
    _idle(pg)
    _shot(pg, "sinks_act")


def test_probes_page_trains_and_exits_live(page):
    pg = page
    _goto(pg, "Probes (LYNX)")
    # smaller than the page's defaults so the test labels in a few minutes (then cached); still enough
    # for the calibrated probe to exit during generation (measured on smollm2-moe: exits at delta 0.1-0.3)
    for label, value in (("Training problems", "16"), ("Calibration problems", "16"), ("Reasoning tokens", "48")):
        _idle(pg)
        field = pg.get_by_label(label, exact=True)
        field.fill(value)
        field.press("Enter")
    _click(pg, "Label, train and calibrate")
    # labelling runs a forced-exit answer at every cue of 32 problems: the page's longest step
    pg.get_by_role("button", name="Generate", exact=True).wait_for(timeout=3 * LONG)
    _click(pg, "Generate")
    pg.get_by_text("generations exited early").wait_for()
    _charts(pg, 1)
    _idle(pg)
    _shot(pg, "probes")
    assert pg.get_by_role("tab").filter(has_text="exit at token").count() >= 1, "no generation exited early"


def test_fingerprints_page_reports_the_decision(page):
    """The page's demo calibrates on 12 benign reruns of the same prompts (other orders and batch sizes) at
    FPR 0.1: no benign window is as long as the whole 4-request claim, but each request is decided at
    0.1/4 (steer.difr CLAIM_RULE), so the page shows a decision with its rule, never 'insufficient'.
    tests/test_app.py checks the same on AppTest."""
    pg = page
    _goto(pg, "Fingerprints (DiFR)")
    pg.get_by_text("make one here (provider side)").click()
    _click(pg, "Fingerprint, and calibrate on benign reruns")
    pg.get_by_role("button", name="Verify", exact=True).wait_for()
    _click(pg, "Verify")
    pg.get_by_text("decided per sequence at FPR 0.1/4 each").first.wait_for()
    assert pg.get_by_text("INSUFFICIENT").count() == 0
    _charts(pg, 1)
    _shot(pg, "fingerprints")


def test_config_page_collects_the_pages(page):
    pg = page
    _goto(pg, "Intervention config")
    pg.get_by_text("Valid for smollm2-moe").wait_for()
    _shot(pg, "config")
