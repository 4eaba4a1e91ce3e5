"""The playground page in a real headless browser (Debian's chromium through chromium-driver and selenium): load it
from a live `rerankd serve`, type a query and documents, add an image document, run a rerank, and check the
rendered ranking against the library's. A screenshot is saved to build/test-artifacts/playground.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..conftest import encode, make_image
from .conftest import Server

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
DOCS = ["Paris is the capital and most populous city of France.", "gold rush merchants", "数据提取么"]


def chromium() -> tuple[str, str]:
    """The browser and its driver, or a skip saying how to get them (scripts/setup.sh installs both as root)."""
    pytest.importorskip("selenium", reason="the dev extra's selenium drives the browser")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium / chromedriver on PATH: apt-get install chromium chromium-driver (scripts/setup.sh "
                    "does it when run as root)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def keyed(m0_dir):
    s = Server(m0_dir, "--api-key", "sesame", "--served-model-name", "tiny-m0")
    yield s
    assert s.stop() == 0


def test_a_person_reranks_in_the_playground(browser, keyed, m0, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "page.png"
    image.write_bytes(encode(make_image(120, 90, seed=5)))
    browser.get(keyed.url + "/playground")
    assert browser.title == "rerankd playground"
    browser.find_element(By.ID, "api-key").send_keys("sesame")
    browser.find_element(By.ID, "query").send_keys("capital of France")
    browser.find_element(By.ID, "documents").send_keys("\n".join(DOCS))
    browser.find_element(By.ID, "docs-file").send_keys(str(image))  # an image document, as a drop would add it
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#docs-chips .chip"))
    browser.find_element(By.ID, "top-n").send_keys("3")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "li.result")))
    rows = browser.find_elements(By.CSS_SELECTOR, "li.result")
    want = m0.rerank("capital of France", [*DOCS, {"image": str(image)}], top_n=3)
    assert [int(r.get_attribute("data-index")) for r in rows] == [w["index"] for w in want]
    shown = [float(r.find_element(By.CSS_SELECTOR, ".score").text) for r in rows]
    assert shown == pytest.approx([w["relevance_score"] for w in want], abs=1e-4)
    stats = browser.find_element(By.ID, "stats").text
    assert "3 of 4 documents" in stats and "tokens" in stats and " ms" in stats
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))


def test_the_playground_shows_the_servers_error(browser, keyed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed.url + "/")  # also served at /
    browser.find_element(By.ID, "query").send_keys("q")
    browser.find_element(By.ID, "documents").send_keys("a document")
    browser.find_element(By.ID, "run").click()  # no API key typed: the server's 401 is shown as it said it
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    assert "HTTP 401" in browser.find_element(By.ID, "error").text
    assert "Authorization" in browser.find_element(By.ID, "error").text
