"""The page `transfer serve` shows at /, driven in a real browser: Debian's chromium and
chromium-driver through Selenium. It skips with the reason where they are not installed."""

import base64
import json
import shutil
import urllib.request

import pytest

from conftest import CATS_DOGS
from test_serve import start_server

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="Selenium is not installed: pip install '.[test]'")
BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason=(
    "Chromium and its driver are not installed: apt-get install chromium chromium-driver"))
WAIT = 60  # seconds for the page to show an answer


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    from transfer.pipeline import export_run

    run_dir, _ = trained_run
    root = tmp_path_factory.mktemp("demo")
    export_run(run_dir, output=root / "saved_models")
    process, base, port = start_server(root / "saved_models" / "stripes", root / "server.log")
    yield f"http://127.0.0.1:{port}", base
    process.terminate()
    process.wait(timeout=30)


def test_the_page_predicts_a_photo_and_says_why_a_broken_file_is_not(browser, served,
                                                                    tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not CATS_DOGS.is_dir():
        pytest.skip(f"{CATS_DOGS} is missing; see ../shared/README.md")
    photo = sorted((CATS_DOGS / "validation" / "cats").glob("*.jpg"))[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    page, api = served

    browser.get(page + "/")
    assert browser.title == "stripes: try the model"
    assert "1 (AVAILABLE)" in browser.find_element(By.ID, "version").text
    files = browser.find_element(By.ID, "files")
    files.send_keys(f"{photo}\n{broken}")  # two files chosen at once
    wait = WebDriverWait(browser, WAIT)
    wait.until(lambda driver: len(driver.find_elements(
        By.CSS_SELECTOR, ".card[data-state]")) == 2)
    browser.save_screenshot(str(tmp_path / "demo.png"))

    # The photo: one bar per class (two here), summing to 1, the best one first and named as
    # the API names it for the same bytes.
    card = browser.find_element(By.CSS_SELECTOR, f'.card[data-file="{photo.name}"]')
    assert card.get_attribute("data-state") == "done"
    bars = card.find_elements(By.CSS_SELECTOR, ".bar")
    labels = [bar.get_attribute("data-label") for bar in bars]
    probabilities = [float(bar.get_attribute("data-probability")) for bar in bars]
    assert sorted(labels) == ["horizontal", "vertical"]
    assert sum(probabilities) == pytest.approx(1, abs=1e-5)
    assert probabilities == sorted(probabilities, reverse=True)
    body = {"signature_name": "serve_bytes",
            "instances": [{"image_bytes": {"b64": base64.b64encode(photo.read_bytes())
                                           .decode()}}]}
    request = urllib.request.Request(api + ":predict", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        (expected,) = json.loads(response.read())["predictions"]
    assert labels[0] == expected["class_name"]
    assert "best" in bars[0].get_attribute("class")
    assert card.find_element(By.CSS_SELECTOR, ".top").text.startswith(expected["class_name"])
    assert probabilities == pytest.approx(sorted(expected["probabilities"], reverse=True),
                                          abs=1e-6)
    assert bool(card.find_elements(By.CSS_SELECTOR, ".unknown")) == expected["unknown"]
    width = bars[0].find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("width")
    track = bars[0].find_element(By.CSS_SELECTOR, ".track").value_of_css_property("width")
    assert float(width[:-2]) / float(track[:-2]) == pytest.approx(probabilities[0], abs=0.01)

    # The broken file: no bars, and the server's reason.
    card = browser.find_element(By.CSS_SELECTOR, '.card[data-file="broken.jpg"]')
    assert card.get_attribute("data-state") == "error"
    assert not card.find_elements(By.CSS_SELECTOR, ".bar")
    error = card.find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("Not predicted: ") and "image" in error.lower()
