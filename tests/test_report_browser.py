"""`qstar report` in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`).

Skipped, with the reason, only when Chromium is absent outside CI; `.ci/run` installs it and sets
CI, where a missing browser fails instead."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image
from report_runs import make_run

from pipeline.report.page import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--window-size=1400,1000"]

if not (CHROMIUM and DRIVER) and not os.environ.get("CI"):
    pytest.skip("chromium or chromedriver not installed (apt-get install chromium "
                "chromium-driver); CI installs them", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (dev extra; needed only with a browser)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

TREES, NODES = 64, 100  # the size the page must stay usable at


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    store = make_run(tmp_path_factory.mktemp("report") / "run", trees=TREES, nodes=NODES)
    return store, build_report(store.root)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and DRIVER, "CI must have chromium and chromedriver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_dump_dom_holds_every_node_of_the_open_tree(big_run):
    store, page = big_run
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    tree_ids = [int(x) for x in re.findall(r'id="r0-n(\d+)"', dom)]
    assert sorted(tree_ids) == list(range(NODES))  # the first problem's tree, every node once
    assert dom.count('data-problem="p/') == TREES  # the problem list: every searched problem


def test_clicking_a_node_shows_its_details_and_rollout(big_run, browser):
    store, page = big_run
    browser.get(page.as_uri())
    browser.find_element(By.CSS_SELECTOR, '#r0-problems li[data-problem="p/5"]').click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#r0-tree .node")
    assert len(rows) == NODES
    tree = [r for r in _rows(store) if r["problem_id"] == "p/5"][0]
    node_id = next(int(k) for k in tree["rollouts"])
    node = tree["tree"]["nodes"][node_id]
    browser.find_element(By.ID, f"r0-n{node_id}").click()
    details = browser.find_element(By.ID, "r0-details")
    assert f"node {node_id}" in details.text
    assert f"{node['q']:.3f}" in details.text and f"{node['prm']:.3f}" in details.text
    rollout = details.find_element(By.CSS_SELECTOR, "pre.rollout")
    assert not rollout.is_displayed()
    details.find_element(By.CSS_SELECTOR, "button.show-rollout").click()
    assert rollout.is_displayed() and tree["rollouts"][str(node_id)]["text"] in rollout.text


def test_best_path_terminal_marks_and_filter(big_run, browser):
    store, page = big_run
    browser.get(page.as_uri())
    first = _rows(store)[0]
    best = {int(e.get_attribute("data-node"))
            for e in browser.find_elements(By.CSS_SELECTOR, "#r0-tree .node.best")}
    assert best == set(first["tree"]["best_trajectory"])
    texts = dict(browser.execute_script("return [...document.querySelectorAll('#r0-tree .node')]"
                                        ".map(e => [+e.dataset.node, e.textContent])"))
    assert sorted(texts) == list(range(NODES))
    for n in first["tree"]["nodes"]:
        text = texts[n["id"]]
        assert text.startswith(("\u25BE", "\u00B7")) and f"[{n['id']}] N={n['visits']}" in text
        if n["terminal"]:
            assert ("\u2713" if n["terminal_reward"] == 1.0 else "\u2717") in text
    Select(browser.find_element(By.CSS_SELECTOR, "#r0 select.filter")).select_by_value("solved")
    listed = [li.get_attribute("data-problem")
              for li in browser.find_elements(By.CSS_SELECTOR, "#r0-problems li")]
    assert listed == [r["problem_id"] for r in _rows(store) if r["solved"]]


def test_a_lineage_link_opens_its_node(big_run, browser):
    store, page = big_run
    browser.get(page.as_uri())
    links = browser.find_elements(By.CSS_SELECTOR, "#r0 table.dpo a.lineage")
    last = links[-1]  # a DPO row of the last problem: another tree than the one open
    target = int(last.text)
    browser.execute_script("arguments[0].scrollIntoView()", last)
    last.click()
    selected = browser.find_element(By.CSS_SELECTOR, "#r0-tree .node.selected")
    assert int(selected.get_attribute("data-node")) == target
    details = browser.find_element(By.ID, "r0-details").text
    assert f"node {target}" in details and "DPO #" in details


def test_screenshot_is_not_blank(big_run, browser, tmp_path):
    store, page = big_run
    browser.get(page.as_uri())
    png = browser.get_screenshot_as_png()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200  # text, Q colours, plots: a blank or unstyled page has a handful
    white = max(colours)[0] / (image.width * image.height)
    assert white < 0.9


def _rows(store):
    return [json.loads(line) for p in sorted((store.root / "iter_000/search").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
