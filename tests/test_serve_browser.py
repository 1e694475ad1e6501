"""The live page in headless Chromium (Debian's chromium + chromium-driver; nothing is downloaded).

The real server serves a small MNIST run; the test opens the page, picks a class by name and checks that the
stored matches, then the matches of newly ingested images, appear with their scores; then that moving the
threshold re-queries. Set ``LOGITSEP_SCREENSHOT=path.png`` to save a screenshot of the page with live matches
(``results/serve/page.png`` was made so). Without Chromium the test is skipped, except under CI (``$CI`` set),
where it fails: ``make test`` installs it (``make browser``).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = (f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                   "(`make browser` does, as root)")
        if os.environ.get("CI"):
            pytest.fail(message + " — required in CI")
        pytest.skip(message)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from logitsep.classifier import calibrate_run
    from logitsep.train import TrainConfig, train

    _require_browser()
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="mnist", loss="batch_ce", steps=300, lr=0.03, batch_size=128), out=out,
          progress=False, eval_splits=())
    calibrate_run(out)
    return out


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1180,860"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))
    yield browser
    browser.quit()


def start_server(run: Path, index: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOGITSEP_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "logitsep.cli", "serve", str(run), "--index", str(index),
                             "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            httpx.get(base + "/health", timeout=2)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.stderr.close()


@pytest.mark.slow
def test_page_shows_stored_then_live_matches(run_dir: Path, driver, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from logitsep.classifier import SingleLogitClassifier
    from logitsep.core.images import encode_png
    from logitsep.serve.service import dataset_images

    images = dataset_images("mnist", "test", (784,))[:240]
    clf = SingleLogitClassifier.from_run(run_dir)
    model = clf.model.double().eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(images.reshape(len(images), -1) / 256.0))[:, 3].numpy()
    threshold = clf.thresholds.global_threshold
    stored, live = images[:120], images[120:]
    stored_ids = set(np.flatnonzero(ref[:120] >= threshold).tolist())
    live_ids = set((120 + np.flatnonzero(ref[120:] >= threshold)).tolist())
    assert stored_ids and live_ids

    def ingest(batch: np.ndarray) -> None:
        body = {"images": [base64.b64encode(encode_png(img)).decode() for img in batch]}
        assert httpx.post(base + "/ingest", json=body, timeout=30).status_code == 200

    proc, base = start_server(run_dir, tmp_path / "index")
    try:
        ingest(stored)
        driver.get(base + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "ready: choose a class")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#class-select option")) == 11
        assert driver.find_element(By.ID, "threshold-value").text == f"{threshold:.2f}"
        slider, reset = driver.find_element(By.ID, "threshold"), driver.find_element(By.ID, "reset-threshold")
        assert slider.is_enabled() and reset.is_enabled()
        Select(driver.find_element(By.ID, "class-select")).select_by_visible_text("3")

        def tile_ids(selector: str) -> set[int]:  # in one script call: the grid may be replaced meanwhile
            script = "return [...document.querySelectorAll(arguments[0])].map((e) => Number(e.dataset.id));"
            return set(driver.execute_script(script, selector))

        wait.until(lambda d: tile_ids(".match") == stored_ids)  # the best stored matches
        wait.until(lambda d: "live" in d.find_element(By.ID, "status").get_attribute("class"))
        for start in range(0, len(live), 20):  # a camera-like feed
            ingest(live[start:start + 20])
            time.sleep(0.1)
        wait.until(lambda d: tile_ids(".match.live") == live_ids)
        assert tile_ids(".match:not(.live)") == stored_ids
        assert driver.find_element(By.ID, "total").text == "240"
        assert driver.find_element(By.ID, "live-count").text == str(len(live_ids))
        for tile in driver.find_elements(By.CSS_SELECTOR, ".match")[:5]:
            score = float(tile.get_attribute("data-score"))
            assert score == pytest.approx(ref[int(tile.get_attribute("data-id"))], abs=1e-4)
            assert tile.find_element(By.TAG_NAME, "figcaption").text.endswith(f"{score:.2f}")
            assert driver.execute_script("return arguments[0].naturalWidth", tile.find_element(By.TAG_NAME, "img"))
        assert float(driver.find_element(By.ID, "search-ms").text) >= 0
        if os.environ.get("LOGITSEP_SCREENSHOT"):
            path = Path(os.environ["LOGITSEP_SCREENSHOT"])
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
        # a higher threshold, with the keyboard: the page searches again and keeps only the items above it
        step = float(slider.get_attribute("step"))
        slider.send_keys(Keys.ARROW_RIGHT * 40)
        wait.until(lambda d: float(d.find_element(By.ID, "threshold-value").text) > threshold + 30 * step)
        high = float(slider.get_attribute("value"))
        expected = set(np.flatnonzero(ref >= high).tolist())
        assert expected < stored_ids | live_ids
        wait.until(lambda d: tile_ids(".match") == expected)
        reset.click()  # back to the calibrated threshold: every match, now as stored items
        wait.until(lambda d: tile_ids(".match") == stored_ids | live_ids)
        assert driver.find_element(By.ID, "threshold-value").text == f"{threshold:.2f}"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_page_adds_a_class_from_selected_matches(run_dir: Path, driver, tmp_path: Path) -> None:
    """Click matches, name them, "add as a new class": the class is enrolled (POST /classes) and searched at once;
    the tiles shown are its items above the global threshold, as the enrolled classifier scores them."""
    import shutil

    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from logitsep.classifier import SingleLogitClassifier
    from logitsep.core.images import encode_png
    from logitsep.serve.service import dataset_images

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    images = dataset_images("mnist", "test", (784,))[:150]
    proc, base = start_server(run, tmp_path / "index")
    try:
        body = {"images": [base64.b64encode(encode_png(img)).decode() for img in images]}
        assert httpx.post(base + "/ingest", json=body, timeout=30).status_code == 200
        driver.get(base + "/")
        wait = WebDriverWait(driver, 120)  # the first enrollment loads the dataset and embeds 4,096 negatives
        wait.until(lambda d: d.find_element(By.ID, "status").text == "ready: choose a class")
        Select(driver.find_element(By.ID, "class-select")).select_by_visible_text("3")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".match")) >= 5)
        picked = []
        for tile in driver.find_elements(By.CSS_SELECTOR, ".match")[:5]:
            picked.append(int(tile.get_attribute("data-id")))
            tile.click()
        assert driver.find_element(By.ID, "selected-count").text == "5 selected"
        assert not driver.find_element(By.ID, "add-class").is_enabled()  # no name yet
        driver.find_element(By.ID, "new-name").send_keys("my threes")
        driver.find_element(By.ID, "add-class").click()
        def chosen(d) -> str:
            status = d.find_element(By.ID, "status")  # a failed enrollment shows its error here (a stream
            if "error" in status.get_attribute("class") and "stream" not in status.text:  # hiccup may too)
                raise AssertionError(status.text)
            return Select(d.find_element(By.ID, "class-select")).first_selected_option.text

        wait.until(lambda d: chosen(d) == "my threes (enrolled)")
        clf = SingleLogitClassifier.from_run(run)
        c = clf.class_names.index("my threes")
        assert clf.enrolled.info[0]["examples"] == 5
        with torch.no_grad():
            scores = clf.score(torch.from_numpy(images.reshape(len(images), -1) / 256.0).float(), c).numpy()
        t = clf.threshold_for(c)
        expected = set(np.flatnonzero(scores >= t).tolist())
        near = set(np.flatnonzero(np.abs(scores - t) < 1e-4).tolist())

        def tile_ids() -> set[int]:
            script = "return [...document.querySelectorAll('.match')].map((e) => Number(e.dataset.id));"
            return set(driver.execute_script(script))

        wait.until(lambda d: tile_ids() - near == expected - near)
        assert set(picked) & expected  # the examples themselves score above the threshold, mostly
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        stop_server(proc)
