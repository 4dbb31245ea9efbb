"""Screenshot the Ray dashboard's actor view (all actors on one page) in headless Chromium.

    pip install playwright==1.49.0          # not a project dependency: a documented check
    python scripts/screenshot_dashboard.py docs/img/dashboard_actors.png [--url http://127.0.0.1:8265]

Run it while `evolve run` is running (it starts the dashboard on
127.0.0.1:8265). Uses the system Chromium (`apt-get install chromium`); the
dashboard shows 10 actors a page, so this sets the page size to 50 first.
"""

from __future__ import annotations

import argparse
import shutil
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--url", default="http://127.0.0.1:8265")
    ap.add_argument("--width", type=int, default=1500)
    args = ap.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("no Chromium found: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": args.width, "height": 1200})
        page.goto(f"{args.url}/#/actors")
        page.wait_for_timeout(4000)
        size = page.locator("input[value='10']").first.element_handle()  # the "Per Page" box
        size.fill("50")
        size.press("Enter")
        page.wait_for_timeout(3000)
        page.screenshot(path=args.out, full_page=True)
        b.close()
    print(args.out)


if __name__ == "__main__":
    main()
