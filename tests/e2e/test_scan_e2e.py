"""Sources and scan in a real browser: add a folder in the Sources tab, scan in the Scan tab, and see the
chart of counts per reason and the rejected files in a data grid whose rows select a file with its reason."""

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

    # the rejected files are in a data grid (ipydatagrid, drawn on a canvas, its JS served by Voilà offline);
    # a click on a row selects that file, and the panel names the source it came from
    grid = page.locator(".refact-lab-scan-files")
    grid.locator("canvas").first.wait_for(timeout=30_000)
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    assert box and box["width"] > 400 and box["height"] >= 24 + 2 * 22   # the header and the two rows
    first_row_y = 24 + 11          # the column header (24 px), then the middle of the first 22 px row
    page.mouse.click(box["x"] + 60, box["y"] + first_row_y)
    selected = page.locator(".refact-lab-scan-selected")
    selected.wait_for(timeout=30_000)
    text = selected.inner_text()
    assert "from folder: shop" in text, text
    assert ("vendor/requests_copy.py" in text and "vendored" in text) or \
           ("package-lock.json" in text and "generated" in text), text

    # sort by file, descending, from the column header's menu (its icon at the header cell's right end);
    # the first row is then the vendored file, and a click on it selects that file, not the one sent first
    page.mouse.click(box["x"] + 294, box["y"] + 17)
    page.locator(".lm-Menu-item", has_text="Sort Descending").click()
    page.wait_for_timeout(500)
    page.mouse.click(box["x"] + 60, box["y"] + first_row_y)
    page.wait_for_selector(".refact-lab-scan-selected >> text=vendor/requests_copy.py", timeout=30_000)
    page.locator(".refact-lab-scan-files").scroll_into_view_if_needed()
    page.mouse.click(box["x"] + 294, box["y"] + 17)
    page.locator(".lm-Menu-item", has_text="Sort Ascending").click()
    page.wait_for_timeout(500)
    page.mouse.click(box["x"] + 60, box["y"] + first_row_y)
    page.wait_for_selector(".refact-lab-scan-selected >> text=package-lock.json", timeout=30_000)

    # the form's labels are human, from the settings metadata
    assert page.locator(".refact-lab-scan-field-max_file_kib label").first.inner_text() == "Max file size (KiB)"
