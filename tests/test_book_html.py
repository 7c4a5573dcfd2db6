"""The published book in a browser: build it with the Pages workflow's own command (stored-only mode:
every table from the committed results/, nothing trained), open every page in headless Chromium, check
figures decoded, math rendered, no error outputs, no Colab or injected-parameters cell; save screenshots.

Needs Debian's chromium and chromium-driver; .ci/run installs them and sets ASYMLIB_REQUIRE_BROWSER=1,
so that in CI a missing browser fails instead of skipping.
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from asymlib.book import REPO_ROOT, build, chapters

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = REPO_ROOT / "_build" / "screenshots"

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("ASYMLIB_REQUIRE_BROWSER"):
        raise RuntimeError("ASYMLIB_REQUIRE_BROWSER is set but chromium/chromedriver are missing "
                           "(apt-get install chromium chromium-driver)")
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def publish_command() -> str:
    """The command of the Pages workflow's build step."""
    text = (REPO_ROOT / ".github" / "workflows" / "pages.yml").read_text()
    m = re.search(r"- name: Build the book \(stored runs only\)\n\s+run: (.+)\n", text)
    assert m, "pages.yml has no 'Build the book (stored runs only)' step"
    return m.group(1).strip()


@pytest.fixture(scope="module")
def site():
    cmd = publish_command()
    assert cmd == "make publish"
    # the workflow's command, run with this test's Python (its venv is set up already)
    r = subprocess.run(["make", "publish", f"PY={sys.executable}", "SETUP="], cwd=REPO_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    html = REPO_ROOT / "_build" / "html"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", html
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--window-size=1280,2400", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


PAGES = [f"notebooks/{nb.stem}.html" for nb in chapters()] + ["book/intro.html", "book/notation.html"]


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_with_figures_math_and_no_errors(site, browser, page):
    from selenium.webdriver.support.ui import WebDriverWait
    url, html = site
    assert (html / page).is_file(), f"{page} was not built"
    browser.get(f"{url}/{page}")
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # MathJax 3 typesets asynchronously: wait for its output elements
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return document.querySelectorAll('mjx-container').length") > 0)
    n_math, n_merror = browser.execute_script(
        "return [document.querySelectorAll('mjx-container').length, document.querySelectorAll('mjx-merror').length]")
    assert n_math > 0 and n_merror == 0
    imgs = browser.execute_script(
        "return [...document.querySelectorAll('article img, main img')]"
        ".map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getAttribute('src')])")
    if page.startswith("notebooks/"):
        assert imgs, f"{page}: no figure"
    for complete, w, h, src in imgs:
        assert complete and w > 0 and h > 0, f"{page}: image {src} did not decode"
    errors = browser.execute_script(
        "return [...document.querySelectorAll('.output.traceback, .output.error, .output.stderr')]"
        ".map(e => e.innerText)")
    assert not [e for e in errors if re.search(r"Error|Traceback|Exception", e)], errors
    if re.match(r"notebooks/0[1-8]_", page):   # every figure and table of every chapter: numbered and captioned
        bare = browser.execute_script(
            "const a = document.querySelector('article') || document.body;"
            "const imgs = [...a.querySelectorAll('img')].filter(i => !(i.closest('figure') &&"
            "  i.closest('figure').querySelector('figcaption .caption-number'))).map(i => 'img ' + i.getAttribute('src'));"
            "const tabs = [...a.querySelectorAll('table')].filter(t => !t.querySelector('caption .caption-number'))"
            "  .map(t => 'table ' + t.innerText.slice(0, 60));"
            "return imgs.concat(tabs);")
        assert not bare, f"{page}: uncaptioned or unnumbered: {bare}"
    body = browser.find_element("tag name", "body").text
    assert "Traceback (most recent call last)" not in body
    # the Colab install cell and papermill's injected parameters stay in the notebook, off the page
    assert "google.colab" not in body and "# Parameters\n" not in body and "REPO_URL" not in body
    assert "QUICK" not in body, f"{page}: a quick (smoke-test) table in the published book"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / (Path(page).stem + ".png")))
