"""Render time of every app page in headless chromium, with results already cached.

    .venv/bin/python benchmarks/app_pages.py                      # real smollm2-135m, fresh temp home
    .venv/bin/python benchmarks/app_pages.py --model PATH --repeats 5 --shots artifacts/bench

Builds a prefilled workbench home (a small store, activation-stats, neuron dashboards, a small
TopK SAE and its latent dashboards), starts `workbench app` on a loopback port, visits every page
once to warm the server (imports, model in st.cache_resource, figures), then times per page:
- load: `page.goto(url)` until the page's own content (table, figure, highlighted tokens) is
  visible, the script run has ended and no skeleton placeholder is left (a full reload, new
  session; before 2026-11-23 17:10 this also waited for Playwright's "network idle", i.e. 500 ms
  without requests, which inflated every load by at least 0.5 s);
- nav: the same after clicking the page in the sidebar (what a user does; same session).
Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.app_pages._demo import CHROMIUM, CHROMIUM_ARGS, prefill, serve  # noqa: E402

READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
NO_SKELETON = "!document.querySelector('[data-testid=\"stSkeleton\"]')"
PAGES = {  # url path -> (sidebar title, selectors that must be visible)
    "": ("Home", ['[data-testid="stTable"]', 'h3:has-text("Cached results")']),
    "prompt_lens": ("Prompt lens", ["span.tok", '[data-testid="stTable"]']),
    "neuron_explorer": ("Neuron explorer", ["span.tok", ".js-plotly-plot"]),
    "feature_explorer": ("Feature explorer", ["span.tok", ".js-plotly-plot"]),
    "analyses": ("Analyses", [".js-plotly-plot", '[data-testid="stDataFrame"]']),
}


def settle(page, selectors: list[str], timeout: float = 120_000) -> None:
    page.wait_for_selector(READY, timeout=timeout)
    page.wait_for_function(NO_SKELETON, timeout=timeout)
    for sel in selectors:
        page.locator(sel).first.wait_for(state="visible", timeout=timeout)
    page.wait_for_selector(READY, timeout=timeout)  # content seen and the script run over
    page.wait_for_function(NO_SKELETON, timeout=timeout)


def time_load(page, url: str, path: str) -> float:
    """A full reload until the content is visible. Not `wait_until="networkidle"`: that waits for
    500 ms without requests after the last one, which is Playwright's heuristic, not render time."""
    start = time.perf_counter()
    page.goto(f"{url}/{path}", wait_until="commit")
    settle(page, PAGES[path][1])
    return time.perf_counter() - start


def time_nav(page, path: str) -> float:
    title, selectors = PAGES[path]
    start = time.perf_counter()
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.wait_for_url(lambda u: u.rstrip("/").endswith(path) if path else True)
    page.get_by_role("heading", level=1).filter(has_text=title if path else "workbench").wait_for()
    settle(page, selectors)
    return time.perf_counter() - start


def build_home(model: str, home: Path) -> dict:
    os.environ["WORKBENCH_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    shared_models = Path.home() / ".cache" / "workbench" / "models"
    if not (home / "models").exists() and shared_models.is_dir():
        (home / "models").symlink_to(shared_models, target_is_directory=True)
    t = time.perf_counter()
    filled = prefill(model, n_tokens=1024, ctx_len=64, train=True)
    print(f"prefilled {home} in {time.perf_counter() - t:.1f} s: {sorted(filled['keys'])}", file=sys.stderr)
    return filled


def measure(url: str, repeats: int, shots: Path | None) -> dict[str, dict[str, list[float]]]:
    from playwright.sync_api import sync_playwright

    times: dict[str, dict[str, list[float]]] = {p: {"load": [], "nav": []} for p in PAGES}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/prompt_lens", wait_until="networkidle")  # the app's default model
        settle(page, PAGES["prompt_lens"][1], timeout=600_000)  # loads it once (cache_resource)
        for path in PAGES:  # warm-up: imports, cached figures
            time_load(page, url, path)
        for _ in range(repeats):
            for path in PAGES:
                times[path]["load"].append(time_load(page, url, path))
            for path in list(PAGES)[1:] + [""]:
                times[path]["nav"].append(time_nav(page, path))
                if shots:
                    shots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shots / f"{path or 'home'}.png"))
        browser.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="model of the prefilled store (the prompt lens uses the app default)",
    )
    ap.add_argument("--home", default=None, help="workbench home to fill and serve (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shots", default=None, help="folder for a screenshot of each page")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium")
    home = Path(args.home or tempfile.mkdtemp(prefix="wb-bench-"))
    build_home(args.model, home)
    with serve(home) as url:
        times = measure(url, args.repeats, Path(args.shots) if args.shots else None)
    load = os.getloadavg()[0]
    print(
        f"\nmodel {args.model}; median of {args.repeats}; 1-min load average {load:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| page | full load (s) | sidebar navigation (s) |")
    print("|---|---|---|")
    for path, (title, _) in PAGES.items():
        t = times[path]
        print(f"| {title} | {statistics.median(t['load']):.2f} | {statistics.median(t['nav']):.2f} |")


if __name__ == "__main__":
    main()
