"""Screenshots of the web app for the README (docs/app-*.png), in Debian's headless Chromium through Playwright.

Usage (from the repository root, after ``bash scripts/setup.sh --dev``):

    .venv/bin/python scripts/app_screenshots.py DICTIONARY FEATURES.duckdb [--report DIR] [--out docs]

Serves the default model with the dictionary and feature database on a free loopback port, opens the
feature browser, the feature page of the latent with the most top contexts peaking on " return" (or of
the densest latent), the prompt inspector on a short code prompt, the steering page with that latent
(value: 8x its max activation), and the patching page when a report is given; 1280 px wide.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dictionary", type=Path)
    ap.add_argument("features", type=Path)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    import mechscope
    from mechscope.app import AppState, create_app, load_report, make_steer
    from mechscope.dictionaries import load_dictionary
    from mechscope.features.db import FeatureDB

    model = mechscope.load(dtype="bfloat16")
    d = load_dictionary(args.dictionary)
    db = FeatureDB(args.features)
    state = AppState(model=model, dictionary=d, db=db, report=load_report(args.report), steer=make_steer(model, d))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    latent = (db.search_tokens(" return", limit=1) or [db.list_latents("density", 0, 1)[0]["id"]])[0]
    value = 8 * db.feature(latent)["max_act"]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860}, bypass_csp=True)  # wait_for_function evals

        def shot(name: str, full_page: bool = False) -> None:
            page.screenshot(path=str(args.out / f"app-{name}.png"), full_page=full_page)
            print(args.out / f"app-{name}.png")

        page.goto(url + "/")
        page.wait_for_selector("tr.lat-row")
        shot("browser")
        page.goto(f"{url}/feature/{latent}")
        page.wait_for_selector(".top-example")
        page.wait_for_selector("#hist .main-svg")
        shot("feature")
        page.goto(url + "/inspect")
        page.fill("#text", "def area(r):\n    return 3.14 * r * r")
        page.click("button[type=submit]")
        page.wait_for_selector("#attn .main-svg")
        shot("inspect", full_page=True)
        page.goto(f"{url}/steer?latent={latent}")
        page.fill("#prompt", "The weather today is")
        page.fill("#val", f"{value:.1f}")
        page.click("button[type=submit]")
        page.wait_for_function("document.getElementById('effect').textContent.length > 0", timeout=300_000)
        shot("steer")
        if args.report is not None:
            page.goto(url + "/patching")
            page.wait_for_selector("#heads .main-svg")
            shot("patching")
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main()
