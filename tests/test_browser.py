"""End to end in a real browser: `workbench app` on a loopback port, driven by Playwright through
Debian's chromium (never `playwright install`). Opens every page, types a prompt in the prompt
lens, runs an analysis from its form and waits for its figure; screenshots land in
artifacts/screenshots/ (the CI artifacts)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from workbench.app_pages._demo import CHROMIUM, CHROMIUM_ARGS, prefill, serve

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: `apt-get install chromium` (.ci/run does)"
    ),
]
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
PROMPT = "The cat sat on the mat. The dog"
WAIT = 120_000  # ms; the first page of a fresh server imports torch, transformers and the analyses


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("browserhome")
    old = os.environ.get("WORKBENCH_HOME")
    os.environ["WORKBENCH_HOME"] = str(root)
    try:
        return prefill(str(tiny_model_dir), n_tokens=384, ctx_len=32, train=True) | {"root": root}
    finally:
        os.environ.pop("WORKBENCH_HOME") if old is None else os.environ.update(WORKBENCH_HOME=old)


@pytest.fixture(scope="module")
def browser_page(home):
    sync_api = pytest.importorskip("playwright.sync_api")
    with serve(home["root"]) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="networkidle")
        yield page
        browser.close()


@pytest.fixture(autouse=True)
def _use_home(request, workbench_home, monkeypatch):
    if "home" in request.fixturenames:
        monkeypatch.setenv("WORKBENCH_HOME", str(request.getfixturevalue("home")["root"]))


def settle(page) -> None:
    """Wait for the script run to end and every placeholder skeleton to be replaced."""
    page.wait_for_selector(READY, timeout=WAIT)
    page.wait_for_function("!document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=WAIT)


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def field(page, label: str):
    """The input or text area labelled `label` (not its help button)."""
    return page.locator(f'input[aria-label="{label}"], textarea[aria-label="{label}"]')


def go(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=WAIT)


def test_home_page(home, browser_page):
    page = browser_page
    page.get_by_role("heading", name="Cached results").wait_for(timeout=WAIT)
    settle(page)
    assert page.get_by_role("button", name="Open").count() == len(home["keys"])
    assert page.get_by_text("train-sae", exact=True).count() == 1
    shot(page, "home")


def test_prompt_lens_types_a_prompt(home, browser_page, tiny_model_dir):
    from transformers import AutoTokenizer

    page = browser_page
    go(page, "Prompt lens")
    field(page, "Model").fill(str(tiny_model_dir))
    field(page, "Model").press("Enter")
    settle(page)
    field(page, "Text").fill(PROMPT)
    field(page, "Text").press("Control+Enter")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = [tok.decode([i]) for i in [tok.bos_token_id, *tok(PROMPT).input_ids]]
    page.wait_for_function(f"document.querySelectorAll('span.tok').length === {len(expected)}", timeout=WAIT)
    settle(page)
    assert page.locator("span.tok").all_text_contents() == expected
    assert page.get_by_text("Next-token predictions").is_visible()
    page.locator(".st-key-pos button").nth(2).click()  # click a token: its tables replace the last one's
    page.get_by_text(f"token 2: {expected[2]!r}").wait_for(timeout=WAIT)
    settle(page)
    shot(page, "prompt_lens")
    field(page, "Model").fill("no-such-model")
    field(page, "Model").press("Enter")
    page.get_by_text("model 'no-such-model'", exact=False).wait_for(timeout=WAIT)
    shot(page, "prompt_lens_error")


def test_analysis_runs_from_its_form(home, browser_page):
    from workbench import api

    page = browser_page
    go(page, "Analyses")
    settle(page)
    before = {r["key"] for r in api.cached("activation-stats")}
    page.get_by_text("Options · Run").click()  # folded while a cached result is shown
    field(page, "store").fill(home["store"])
    field(page, "fire_threshold").fill("0.02")
    field(page, "fire_threshold").press("Tab")
    page.get_by_role("button", name="Run", exact=True).click()
    deadline = time.time() + WAIT / 1000
    while not ({r["key"] for r in api.cached("activation-stats")} - before) and time.time() < deadline:
        time.sleep(0.5)
    (new,) = {r["key"] for r in api.cached("activation-stats")} - before
    page.get_by_role("heading", name=f"activation-stats · {new[:12]}").wait_for(timeout=WAIT)
    settle(page)
    assert page.locator(".js-plotly-plot").count() == min(2, len(api.load(new).figures()))
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    shot(page, "analyses")


def test_neuron_explorer_jumps_to_a_neighbour(home, browser_page):
    page = browser_page
    go(page, "Neuron explorer")
    page.locator(".js-plotly-plot").first.wait_for(timeout=WAIT)
    settle(page)
    assert page.locator("span.tok").count() > 0
    shot(page, "neuron_explorer")
    neighbour = page.get_by_role("button", name=re.compile(r"^#\d+ · r ")).first
    target = int(neighbour.inner_text().split()[0][1:])
    neighbour.click()
    page.wait_for_function(
        f"document.querySelector('input[aria-label^=\"Neuron\"]').value === '{target}'", timeout=WAIT
    )


def test_feature_explorer_shows_latents(home, browser_page):
    page = browser_page
    go(page, "Feature explorer")
    page.get_by_text("Max-activating contexts").wait_for(timeout=WAIT)
    settle(page)
    assert page.get_by_test_id("stDataFrame").count() >= 1
    assert page.locator(".js-plotly-plot").count() == 1
    shot(page, "feature_explorer")
    from workbench import api

    live = [r for r in api.load(home["keys"]["latent-dashboards"]).table() if r["density"] > 0]
    second = sorted(live, key=lambda r: r["density"], reverse=True)[1]["latent"]
    grid = page.get_by_test_id("stDataFrame").first.bounding_box()
    page.mouse.click(grid["x"] + 12, grid["y"] + 35 + 35 + 17)  # row marker of the second row
    page.wait_for_function(
        f"document.querySelector('input[aria-label^=\"Latent\"]').value === '{second}'", timeout=WAIT
    )


def test_stopping_the_app_leaves_no_server_behind(tmp_path):
    """`workbench app` execs Streamlit, so terminating it stops the server (no orphan serving)."""
    import socket
    from urllib.parse import urlparse

    with serve(tmp_path) as url:
        port = urlparse(url).port
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
