"""Fine-tuning in a real browser: start a tiny run from the Fine-tune tab and watch the loss plot gain points
while it trains (the panel's polling thread pushes the new picture; nothing is clicked after Start), and the
log box open on its newest lines."""

from __future__ import annotations

import time

from refact_lab.home import Home
from tests.e2e.conftest import click_tab, open_app
from tests.finetune.conftest import TEST_FILES, TRAIN_FILES, build_learnable_model, write_dataset


def _points(page) -> int:
    loc = page.locator(".refact-lab-loss-caption .train-points")
    if loc.count() == 0:
        return 0
    return int(loc.first.get_attribute("data-n") or 0)


def test_start_a_run_and_see_the_loss_plot_grow(page, server, tmp_path):
    home = Home.resolve(server.home_dir).ensure()
    write_dataset(home, "stdlib_e2e", {"train": TRAIN_FILES[:8], "test": TEST_FILES[:2]})
    model = build_learnable_model(tmp_path / "model")
    open_app(page, server)
    click_tab(page, "Fine-tune")

    page.locator(".refact-lab-finetune-model input").fill(str(model))
    page.locator(".refact-lab-finetune-dataset select").select_option("stdlib_e2e")
    for name, value in {"seq_len": 128, "batch_size": 4, "eval_every": 5, "checkpoint_every": 10,
                        "max_test_rows": 8, "learning_rate": 0.01}.items():
        auto = page.locator(f".refact-lab-field-{name} input[type=checkbox]")
        if auto.count():           # an auto field: untick auto to type a number
            auto.uncheck()
        box = page.locator(f".refact-lab-field-{name} input:not([type=checkbox])").first
        box.fill(str(value))
        box.press("Enter")
    page.locator(".refact-lab-field-train_steps input[type=checkbox]").uncheck()
    steps = page.locator(".refact-lab-field-train_steps input[type=number]")
    steps.fill("40")
    steps.press("Enter")

    page.locator("button.refact-lab-finetune-start").click()
    page.wait_for_selector(".refact-lab-finetune-message >> text=Started run", timeout=30_000)

    # the plot gains points while the run trains
    deadline = time.time() + 150
    first = 0
    while time.time() < deadline and first == 0:
        first = _points(page)
        time.sleep(0.5)
    assert first > 0, page.locator(".refact-lab-run-log").inner_text()
    while time.time() < deadline and _points(page) <= first:
        time.sleep(0.5)
    later = _points(page)
    assert later > first, (first, later)
    image = page.locator(".refact-lab-loss-plot img").first
    image.wait_for(timeout=10_000)
    box = image.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 100
    assert "running" in page.locator(".refact-lab-progress-text").inner_text() or later == 40
    # a log longer than its box: the box shows its end, the newest line at the bottom edge
    from refact_lab.finetune.runs import append_log

    [run_id] = [p.name for p in home.runs_dir.iterdir()]
    for i in range(60):
        append_log(home.run_dir(run_id), f"filler line {i}")
    page.wait_for_selector(".refact-lab-run-log >> text=filler line 59", timeout=30_000)
    overflow, gap = page.locator(".refact-lab-log-box").evaluate(
        "el => [el.scrollHeight > el.clientHeight + 10,"
        " el.getBoundingClientRect().bottom - el.querySelector('pre').getBoundingClientRect().bottom]")
    assert overflow and abs(gap) < 5, (overflow, gap)
    # the run outlives the page; stop it so it does not outlive the test
    from refact_lab.finetune.runs import ACTIVE, RunService

    service = RunService(home)
    for run in service.runs():
        if run["state"] in ACTIVE:
            service.stop(run["run_id"])
            service.wait(run["run_id"], timeout=60)
