"""Open a compare/demo report.html in headless Chromium and assert that its table and every image rendered.

    python scripts/check_report_html.py runs/compare/report.html [--screenshot shot.png]
"""

import argparse
import sys

from diffdistill.eval.html_check import render_check


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page")
    p.add_argument("--screenshot")
    a = p.parse_args()
    r = render_check(a.page, screenshot=a.screenshot)
    bad = [i["alt"] for i in r["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    print(f"{a.page}: title {r['title']!r}, {r['rows']} table rows, {r['cells']} cells, "
          f"{len(r['images'])} images ({len(bad)} not rendered)")
    for i in r["images"]:
        print(f"  {i['width']}x{i['height']}  {i['alt']}")
    if r["rows"] == 0 or bad or not r["images"]:
        print("FAILED: " + ("no table rows" if r["rows"] == 0 else f"images not rendered: {bad or 'none found'}"))
        return 1
    print("OK: table and images rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
