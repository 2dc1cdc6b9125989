"""The demo page in a real browser: Debian's headless Chromium (driven by Selenium through Debian's ChromeDriver)
loads the page, picks the bundled scene's example question, presses Compare, waits for both answers and checks them
on the page, then saves a screenshot.

`make browser` installs chromium and chromium-driver. Without them this test skips, unless VLMPLUG_REQUIRE_BROWSER=1
(set by .ci/run), where their absence fails it. VLMPLUG_UPDATE_SCREENSHOT=1 also writes the screenshot to
docs/demo.png (the README's picture).
"""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("VLMPLUG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VLMPLUG_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRED = os.environ.get("VLMPLUG_REQUIRE_BROWSER") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def _missing(what: str):
    if REQUIRED:
        pytest.fail(f"{what} (VLMPLUG_REQUIRE_BROWSER=1: run `make browser`)")
    pytest.skip(f"{what}: run `make browser` to install Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    pytest.importorskip("gradio", reason="the demo needs the demo extra (gradio)")
    pytest.importorskip("selenium", reason="the browser test needs selenium (dev extra)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            _missing(f"{path} is missing")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, should anything reach it, must not try the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1300",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _value(d, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    boxes = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    return boxes[0].get_attribute("value") if boxes else ""


def test_the_page_answers_the_example_plainly_and_under_fastv(driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from test_demo import QUESTION, shared_server

    _, url = shared_server()
    d = driver
    d.get(url)
    wait = WebDriverWait(d, 60)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#compare")))
    assert "fastv" in d.find_element(By.CSS_SELECTOR, "#methods").text
    # the example: the bundled scene's first question, picked from the scene's questions (another one first, so the
    # question box visibly changes with each pick)
    def example(text):
        return wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//*[@id='scene-questions']//button[.//*[normalize-space()='{text}']]")))

    example("Where is the circle?").click()
    wait.until(lambda d: _value(d, "question") == "Where is the circle?")
    example(QUESTION).click()
    wait.until(lambda d: _value(d, "question") == QUESTION)
    d.find_element(By.CSS_SELECTOR, "#compare").click()
    wait.until(lambda d: _value(d, "plain-answer") and _value(d, "patched-answer"))
    assert (_value(d, "plain-answer"), _value(d, "patched-answer")) == ("red", "red")
    wait.until(lambda d: "16 / 64" in d.find_element(By.CSS_SELECTOR, "#results").text)
    table = d.find_element(By.CSS_SELECTOR, "#results").text
    assert "fastv:keep_ratio=0.25" in table and "plain" in table
    status = d.find_element(By.CSS_SELECTOR, "#status").text
    assert "expected: red" in status and "Error" not in status
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pictures img")) >= 2)  # heatmap, kept tokens
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#budget-plot img"))  # accuracy vs budget
    height = d.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    d.set_window_size(1400, min(max(int(height), 900), 2400))
    d.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "demo.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("VLMPLUG_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, os.path.join(ROOT, "docs", "demo.png"))

    # one click draws a new world scene: its questions become the examples, and Compare knows their answers
    d.find_element(By.CSS_SELECTOR, "#random-scene").click()
    wait.until(lambda d: "World scene" in d.find_element(By.CSS_SELECTOR, "#status").text)
    asked = _value(d, "question")
    assert asked
    example(asked)  # offered among the scene's questions
    d.find_element(By.CSS_SELECTOR, "#compare").click()
    wait.until(lambda d: "expected:" in d.find_element(By.CSS_SELECTOR, "#status").text)
    assert _value(d, "plain-answer") and _value(d, "patched-answer")
