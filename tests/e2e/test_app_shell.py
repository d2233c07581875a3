"""The app at `/` in a real browser: Voilà renders the workbench's six tabs, and a click shows a tab's content."""

from tests.e2e.conftest import click_tab, open_app

TAB_TITLES = ["Model hosting", "Sources", "Scan", "Fine-tune", "Deploy", "Settings"]


def test_app_shows_six_tabs_and_switches(page, server):
    open_app(page, server)
    titles = [t.strip() for t in page.locator(".lm-TabBar-tab .lm-TabBar-tabLabel").all_inner_texts()]
    for title in TAB_TITLES:
        assert title in titles, titles
    click_tab(page, "Settings")
    page.wait_for_selector("text=state directory", timeout=30_000)
    assert str(server.home_dir) in page.content()
