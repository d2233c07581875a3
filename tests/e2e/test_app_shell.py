"""The app at `/` in a real browser: Voilà renders the workbench's six tabs under the journey bar, and a click
shows a tab's content."""

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


def test_journey_bar_leads_through_the_steps(page, server):
    open_app(page, server)
    steps = [t.strip() for t in page.locator(".refact-lab-journey-step").all_inner_texts()]
    assert steps == ["1 Model", "2 Sources", "3 Scan", "4 Fine-tune", "5 Deploy"], steps
    page.locator(".refact-lab-journey-step", has_text="3 Scan").click()
    page.wait_for_selector(".lm-TabBar-tab.lm-mod-current >> text=Scan", timeout=30_000)
    page.wait_for_selector(".refact-lab-scan-field-max_file_kib", timeout=30_000)
