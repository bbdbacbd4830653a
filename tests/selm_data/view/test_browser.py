"""The viewer in a real browser: Debian's headless Chromium driven by selenium against the server
running on 127.0.0.1 (uvicorn, in a thread). It opens the overview, filters pairs, opens a pair,
follows lineage links, checks what each page shows against the store, and checks that the
planted `<script>` and `<img onerror>` payloads do not run (each would set document.title and
window.__pwned) while their text is shown.

`make test` installs chromium and chromium-driver and sets SELM_REQUIRE_OPTIONAL=1: there a
missing browser fails instead of skipping. SELM_VIEW_SCREENSHOTS=DIR also saves a PNG of each
main page there (how docs/img/view-*.png were made).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from helpers import require
from viewstore import SHARED, Built, built_store

pytestmark = pytest.mark.slow
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_store(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(built: Built) -> Iterator[str]:
    require("starlette", "'selm[view]'")
    import uvicorn

    from selm_data.view.app import make_app

    port = _free_port()
    config = uvicorn.Config(make_app(built.store), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the viewer did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = require("selenium.webdriver", "selenium")
    missing = [p for p in CHROMIUM if not shutil.which(p)]
    if missing:
        message = (f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                   "(make test installs them)")
        if os.environ.get("SELM_REQUIRE_OPTIONAL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMIUM[1]), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _by() -> Any:
    from selenium.webdriver.common.by import By

    return By


def _screenshot(driver: Any, name: str) -> None:
    folder = os.environ.get("SELM_VIEW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(height + 200, 700), 2600))  # + the window frame
        driver.save_screenshot(str(Path(folder) / f"view-{name}.png"))
        driver.set_window_size(1400, 1000)


def _go(driver: Any, element: Any) -> None:
    """Click a link or button and wait until the next page has replaced this one (a click
    returns before the navigation it starts has finished)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(_by().TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def _not_pwned(driver: Any) -> None:
    assert driver.execute_script("return window.__pwned === undefined")
    assert "pwned" not in driver.title


def test_overview_filter_pair_and_lineage(server, browser, built):
    by, store = _by(), built.store
    browser.get(server + "/")
    assert browser.title == "Overview · selm-data view"
    stats = browser.find_element(by.ID, "stats").text
    pairs_per_iteration = (store.scan("pairs").group_by("iteration").len().sort("iteration")
                           .collect()["len"].to_list())
    pairs_row = next(line for line in stats.splitlines() if line.startswith("pairs"))
    assert pairs_row.split()[1:] == [str(n) for n in pairs_per_iteration]
    assert "it1" in browser.find_element(by.ID, "snapshots").text
    assert "ckpt/iter1" in browser.find_element(by.ID, "checkpoints").text
    plot = browser.find_element(by.ID, "scores-plot")
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 100  # loaded
    _screenshot(browser, "overview")
    if os.environ.get("SELM_VIEW_SCREENSHOTS"):
        browser.get(server + "/pairs?iter=1&sort=-margin")
        _screenshot(browser, "pairs")
        code = (store.scan("pairs").join(store.scan("prompts"), on="prompt_id")
                .filter(pl.col("messages").list.first().struct.field("content") == "Show me code")
                .collect()["pair_id"][0])
        browser.get(server + f"/pair/{code}")  # markdown and a code block, rendered
        _screenshot(browser, "pair")
        browser.get(server + "/")

    # Pairs of iteration 1 where y_ref was chosen, through the form as a user sets it.
    _go(browser, browser.find_element(by.ID, "nav-pairs"))
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(by.ID, "f-iter")).select_by_value("1")
    Select(browser.find_element(by.ID, "f-ref")).select_by_value("chosen")
    _go(browser, browser.find_element(by.ID, "f-apply"))
    want = (store.scan("pairs").filter((pl.col("iteration") == 1)
                                       & (pl.col("chosen_id") == pl.col("ref_id")))
            .collect()["pair_id"].sort().to_list())
    rows = browser.find_elements(by.CSS_SELECTOR, "tr.pair-row")
    assert sorted(r.get_attribute("data-pair") for r in rows) == want
    assert browser.find_element(by.ID, "count").text.startswith(f"{len(want)} pair")

    # A text search narrows to the shared prompt's pair; open it.
    box = browser.find_element(by.ID, "f-q")
    box.clear()
    box.send_keys("capital")
    Select(browser.find_element(by.ID, "f-ref")).select_by_value("")
    _go(browser, browser.find_element(by.ID, "f-apply"))
    rows = browser.find_elements(by.CSS_SELECTOR, "tr.pair-row")
    assert len(rows) == 1
    _go(browser, rows[0].find_element(by.CSS_SELECTOR, "a.pair-link"))
    pair_id = browser.current_url.rsplit("/", 1)[1]
    pair = store.scan("pairs").filter(pl.col("pair_id") == pair_id).collect().row(0, named=True)
    assert browser.find_element(by.ID, "margin").text == f"{pair['margin']:.3f}"
    assert SHARED in browser.find_element(by.ID, "prompt").text
    assert "test-ranker 7" in browser.find_element(by.ID, "ranker").text

    # Lineage: the snapshot that holds the pair, then the checkpoint trained on it.
    _go(browser, browser.find_element(by.CSS_SELECTOR,
                                      "#downstream-checkpoints a.checkpoint-link"))
    assert browser.find_element(by.ID, "row-id").text == built.checkpoint_id
    assert "ckpt/iter1" in browser.page_source
    browser.back()
    _go(browser, browser.find_element(by.CSS_SELECTOR, "#downstream-snapshots a.snapshot-link"))
    shown = browser.find_elements(by.CSS_SELECTOR, "tr.pair-row")
    assert len(shown) == store.scan("snapshots").filter(pl.col("name") == "it1").collect()[
        "row_count"][0]

    # The same prompt across iterations: the policy's answer at each.
    browser.back()
    _go(browser, browser.find_element(by.ID, "prompt-across"))
    assert browser.find_element(by.ID, "iteration-1").text.count("Paris, said the policy.") == 1
    assert "Paris is the capital." in browser.find_element(by.ID, "iteration-2").text
    _not_pwned(browser)


def test_planted_script_and_onerror_do_not_run(server, browser, built):
    by = _by()
    browser.get(server + "/pairs?iter=1&q=dangerous")
    _not_pwned(browser)
    assert "<script>document.title" in browser.find_element(by.ID, "pairs").text
    _go(browser, browser.find_element(by.CSS_SELECTOR, "a.pair-link"))
    time.sleep(0.5)  # an onerror fires once the image has failed to load
    _not_pwned(browser)
    assert browser.title.startswith("Pair ")
    text = browser.find_element(by.TAG_NAME, "main").text
    assert 'document.title="pwned-script"' in text and "onerror=" in text  # shown as text
    assert browser.find_elements(by.CSS_SELECTOR, "main img") == []
    browser.get(server + "/pairs?snapshot=it1&q=pwned")
    _not_pwned(browser)
    assert len(browser.find_elements(by.CSS_SELECTOR, "tr.pair-row")) == 1


def test_compare_two_iterations(server, browser, built):
    by = _by()
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/compare")
    Select(browser.find_element(by.ID, "c-a")).select_by_value("1")
    Select(browser.find_element(by.ID, "c-b")).select_by_value("2")
    _go(browser, browser.find_element(by.ID, "c-apply"))
    overlap = browser.find_element(by.ID, "overlap").text
    assert "prompts 12 3 1" in overlap  # one prompt was built in both iterations
    _screenshot(browser, "compare")
    # An evaluation question: what the base policy and iteration 1's checkpoint answered.
    _go(browser, browser.find_element(by.CSS_SELECTOR, "a.question-link"))
    question = browser.current_url.rsplit("id=", 1)[1]
    want = (built.store.scan("eval_answers").filter(pl.col("question_id") == question)
            .sort("iteration").collect())
    for label, text in zip(("base", "iter1"), want["text"].to_list(), strict=True):
        assert text in browser.find_element(by.ID, f"policy-{label}").text
