"""The README's picture of `qstar report`: build a run's page, open it in headless Chromium, click
the deepest node of a solved problem's best path, show its rollout, and save a screenshot.

    python benchmarks/report_screenshot.py RUN [--problem ID] [--credit [best|all]] [--out PATH]

Needs Debian's `chromium` and `chromium-driver` and the dev extra's selenium (as the browser
test does). Writes benchmarks/results/report.png unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from pipeline.report.page import build_report
from pipeline.run.atomic import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"


def open_browser(width: int, height: int):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        sys.exit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--problem", default=None, help="default: the first solved problem")
    parser.add_argument("--credit", nargs="?", const="best", choices=("best", "all"),
                        help="as qstar report --credit")
    parser.add_argument("--out", default=str(RESULTS / "report.png"))
    parser.add_argument("--size", default="1400x1800", help="window WIDTHxHEIGHT in pixels")
    opts = parser.parse_args()
    page = build_report(Path(opts.run), credit=opts.credit)
    width, height = (int(x) for x in opts.size.split("x"))
    browser = open_browser(width, height)
    try:
        browser.get(page.as_uri())
        problems = browser.find_elements(By.CSS_SELECTOR, "#r0-problems li")
        chosen = [li for li in problems if li.get_attribute("data-problem") == opts.problem or
                  (opts.problem is None and li.text.startswith("\u2713"))]
        (chosen or problems)[0].click()
        best = browser.find_elements(By.CSS_SELECTOR, "#r0-tree .node.best")
        best[-1].click()
        for button in browser.find_elements(By.CSS_SELECTOR, "#r0-details button.show-rollout"):
            button.click()
        for summary in browser.find_elements(By.CSS_SELECTOR, "#r0 .credit summary")[:1]:
            summary.click()  # the first credit map, drawn on opening
        browser.execute_script("window.scrollTo(0, 0)")
        with atomic_path(opts.out, suffix=".png") as tmp:
            browser.save_screenshot(str(tmp))
    finally:
        browser.quit()
    print(opts.out)


if __name__ == "__main__":
    main()
