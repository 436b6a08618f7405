"""Headless Chromium for the review page's tests: Debian's chromium and chromium-driver, driven by
Selenium, with nothing downloaded (no Selenium Manager, no browser fetched)."""

from __future__ import annotations

import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 900
MISSING = (
    "the browser tests need Debian's chromium and chromium-driver "
    "(apt-get install -y --no-install-recommends chromium chromium-driver, as .ci/run does); "
    'to run the other tests without them: python -m pytest tests -m "not browser"'
)


def start_chromium(downloads: Path):
    """A headless Chromium with a 1280x900 viewport that saves downloads into `downloads`.
    Without Chromium this raises: the browser tests fail, they never skip."""
    for needed in (CHROMIUM, CHROMEDRIVER):
        if not needed.is_file():
            raise RuntimeError(f"{needed} not found: {MISSING}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless",
        f"--window-size={WIDTH},{HEIGHT}",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # containers have a tiny /dev/shm
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--force-color-profile=srgb",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    downloads.mkdir(parents=True, exist_ok=True)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    # An explicit driver path: Selenium Manager is never run, so nothing is looked up or downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        # The viewport itself 1280x900, whatever the window's decorations take.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        save_downloads_in(driver, downloads)
    except Exception:
        driver.quit()
        raise
    return driver


def save_downloads_in(driver, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})


def open_page(driver, page: Path, seconds: float = 10) -> None:
    """Open a page from file:// and wait until its first page of cards is shown (body data-ready="1")."""
    driver.get(page.resolve().as_uri())
    deadline = time.monotonic() + seconds
    while True:
        ready = driver.execute_script("return document.body && document.body.dataset.ready")
        if ready == "1":
            return
        if ready == "error":
            raise AssertionError("the page says: " + driver.find_element("tag name", "body").text)
        if time.monotonic() > deadline:
            raise AssertionError(f"{page.name}: no data-ready after {seconds} s")
        time.sleep(0.02)


def wait_for_file(path: Path, seconds: float = 10) -> str:
    """The text of a downloaded file once Chromium has finished writing it."""
    deadline = time.monotonic() + seconds
    while not path.is_file() or path.with_name(path.name + ".crdownload").exists():
        if time.monotonic() > deadline:
            listing = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else "no folder"
            raise AssertionError(f"{path.name} was not downloaded; the folder holds {listing}")
        time.sleep(0.02)
    return path.read_text(encoding="utf-8")


def screenshot(driver, path: Path) -> Path:
    """A screenshot of the viewport (1280x900), its path printed for whoever runs the tests with -s."""
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def alert_shown(driver) -> str | None:
    """The text of a JavaScript alert the page raised, if any."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return None
    text = alert.text
    alert.dismiss()
    return text
