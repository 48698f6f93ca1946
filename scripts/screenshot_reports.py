"""Render results/index.html and every stage's reader report to PNG with headless Chromium, to look at
before committing results (Debian: `apt-get install chromium`).

    python scripts/screenshot_reports.py            # -> .screenshots/index.png, .screenshots/03_ablations.reader.png,
    ...
    python scripts/screenshot_reports.py --height 4000 --out /tmp/shots

Each page is shot at a reader's width (1300 px) and a tall height, so a PNG shows the whole first
screens of a report; the script prints the PNGs it wrote and fails when Chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium found: install it (Debian/Ubuntu: apt-get install chromium) and run this again")


def shoot(browser: str, page: Path, png: Path, width: int, height: int) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "results"), help="the results folder (default: results/)")
    parser.add_argument(
        "--out", default=str(REPO / ".screenshots"), help="where the PNGs go (default: .screenshots/, not committed)"
    )
    parser.add_argument("--width", type=int, default=1300)
    parser.add_argument("--height", type=int, default=2600)
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    pages = [results / "index.html", *sorted(results.glob("[0-9][0-9]_*/*.reader.html"))]
    for page in (p for p in pages if p.exists()):
        png = out / f"{page.stem}.png"
        shoot(browser, page, png, args.width, args.height)
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
