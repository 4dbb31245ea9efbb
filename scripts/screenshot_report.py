"""Screenshot a page with headless Chromium: a run's report.html, or a URL.

    python scripts/screenshot_report.py RUN_DIR/report.html OUT.png [--width 1200 --height 3000]
    python scripts/screenshot_report.py http://127.0.0.1:8265 dash.png --virtual-time-budget 10000

Needs a Chromium binary (`chromium`, `chromium-browser` or `google-chrome` on
PATH); on Debian: `apt-get install chromium`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found (looked for " + ", ".join(BROWSERS) + " on PATH); "
                     "install it, e.g. `apt-get install chromium` on Debian")


def page_url(target: str) -> str:
    if target.startswith(("http://", "https://", "file://")):
        return target
    path = Path(target).resolve()
    if not path.is_file():
        raise SystemExit(f"{target}: no such file")
    return path.as_uri()


def screenshot(target: str, out: Path, width: int = 1200, height: int = 3000,
               virtual_time_budget_ms: int = 5000, timeout_s: float = 120.0) -> Path:
    """Render `target` (a file path or an http(s)/file URL) into the PNG `out`."""
    browser = find_browser()
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshot-profile-") as profile:
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={virtual_time_budget_ms}", f"--screenshot={out}", page_url(target)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{browser} did not finish within {timeout_s:.0f} s")
    if not out.is_file() or out.read_bytes()[:8] != PNG_MAGIC:
        raise SystemExit(f"{browser} made no PNG at {out} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="report.html (or any HTML file), or an http(s) URL")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--virtual-time-budget", type=int, default=5000, metavar="MS",
                    help="let the page run this many ms of virtual time (scripts, fetches) before the shot")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the browser")
    a = ap.parse_args(argv)
    out = screenshot(a.target, a.out, a.width, a.height, a.virtual_time_budget, a.timeout)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
