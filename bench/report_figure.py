"""A PNG of chosen charts of an `align report` page, for docs (the page itself is the artefact; this is its picture).

    align report runs/compare-arithmetic --metric entropy -o /tmp/compare.html
    python bench/report_figure.py /tmp/compare.html --chart "Entropy" --chart "Held-out accuracy" \
        -o docs/comparisons-entropy.png

Charts are picked by the start of their title (the SVG's aria-label). Needs Chromium (`apt-get install chromium`)
and playwright (the dev extra); no browser is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--chart", action="append", required=True, help="title prefix of a chart to keep")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(args.page.resolve().as_uri())
        kept = page.evaluate(
            """(prefixes) => {
                const keep = [...document.querySelectorAll('svg.chart')].filter(
                    svg => prefixes.some(p => (svg.getAttribute('aria-label') || '').startsWith(p)));
                const key = document.querySelector('.run-key');  // the colour of each method or run
                const holder = document.createElement('div');
                holder.id = 'figure';
                holder.style.cssText = 'display:flex;flex-wrap:wrap;gap:8px;padding:8px;background:white;width:940px';
                if (key) {
                    const row = key.parentElement.cloneNode(true);
                    row.style.width = '100%';
                    holder.appendChild(row);
                }
                for (const svg of keep) { holder.appendChild(svg); }
                document.body.replaceChildren(holder);
                return keep.length;
            }""",
            args.chart,
        )
        if kept == 0:
            sys.exit(f"no chart title starts with any of {args.chart}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        page.locator("#figure").screenshot(path=str(args.output))
        browser.close()
    print(f"{kept} charts -> {args.output}")


if __name__ == "__main__":
    main()
