"""Browser fixtures: Debian's Chromium driven by Playwright (no browser download; the system one)."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("REFACT_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


# One browser per module, not per session: a live sync Playwright keeps its event loop registered as the
# thread's running loop, which later tests' asyncio fixtures (pytest-jupyter's jp_asyncio_loop) then try to close.
@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh browser page; on failure a screenshot is saved beside the test's tmp folder."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    try:
        pg.screenshot(path=str(tmp_path / "last.png"), full_page=True)
    except Exception:
        pass
    context.close()


def open_app(page, server, timeout_ms: int = 90_000):
    """Open `/` and wait until Voilà has rendered the workbench tabs."""
    page.goto(server.app_url)
    page.wait_for_selector(".lm-TabBar-tab >> text=Model hosting", timeout=timeout_ms)
    return page


def click_tab(page, title: str):
    page.locator(".lm-TabBar-tab", has_text=title).first.click()
