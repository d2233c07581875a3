"""Sources and scan in a real browser: add a folder in the Sources tab, scan in the Scan tab, and see the
chart of counts per reason and a rejected file with its reason."""

from __future__ import annotations

from tests.data.conftest import good_py, write_tree
from tests.e2e.conftest import click_tab, open_app


def test_add_source_scan_see_chart_and_rejected_reason(page, server, tmp_path):
    project = write_tree(tmp_path / "shop", {
        **{f"shop/module_{i}.py": good_py(i) for i in range(5)},
        "vendor/requests_copy.py": good_py(60),
        "package-lock.json": '{"lockfileVersion": 3}\n',
    })
    open_app(page, server)

    click_tab(page, "Sources")
    page.locator(".refact-lab-sources-folder-path input").fill(str(project))
    page.locator("button.refact-lab-sources-add-folder").click()
    page.wait_for_selector(".refact-lab-sources-message >> text=Added folder: shop", timeout=30_000)
    page.wait_for_selector(".refact-lab-sources-list option >> text=folder: shop", state="attached")

    click_tab(page, "Scan")
    # The new source is already listed in the Scan tab (one service behind both tabs).
    page.wait_for_selector(".refact-lab-scan-sources >> text=folder: shop", timeout=15_000)
    # Stage 1 only: the embedded demo model is not what this test is about.
    page.locator(".refact-lab-scan-field-lm_filter input[type=checkbox]").uncheck()
    page.locator("button.refact-lab-scan-start").click()

    page.wait_for_selector(".refact-lab-scan-progress >> text=Done: 5 accepted, 2 rejected", timeout=60_000)
    chart = page.locator(".refact-lab-scan-chart img")
    chart.wait_for(timeout=30_000)
    box = chart.bounding_box()
    assert box and box["width"] > 200 and box["height"] > 50          # a real picture, not a repr string
    assert page.locator(".refact-lab-scan-summary .accepted-count").inner_text() == "5"

    # the browser shows the labels with non-breaking spaces
    options = [o.replace("\xa0", " ") for o in page.locator(".refact-lab-scan-files option").all_inner_texts()]
    assert any(o.startswith("vendor/requests_copy.py") and "vendored: inside vendor/" in o for o in options), options
    assert any(o.startswith("package-lock.json") and "generated: lock file" in o for o in options), options
