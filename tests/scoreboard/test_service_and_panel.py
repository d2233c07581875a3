"""The scoreboard service (a run's evaluation, best_by, the after-run hook) and its panel, without a browser."""

from __future__ import annotations

import html
import time

from refact_lab.home import atomic_write_json, read_json
from refact_lab.scoreboard.service import ScoreboardService, after_run, evaluate_run


def _wait_job(service, timeout=300):
    deadline = time.monotonic() + timeout
    while service.job()["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    return service.job()


def test_panel_shows_base_vs_checkpoint_and_the_samples(home, default_run):
    from refact_lab.ui.scoreboard_panel import ScoreboardPanel

    service = ScoreboardService(home)
    panel = ScoreboardPanel(service, run_id=default_run)
    assert "not evaluated yet" in panel.summary.value and not panel.chart.outputs
    panel.cursors.value = 5
    panel.evaluate_button.click()
    job = _wait_job(service)
    assert job["state"] == "finished", job
    panel.refresh()
    # base and the best checkpoint (step 4, the lowest test loss), a bar chart, samples with the expected text
    assert "default+run-a/step-000004" in panel.summary.value and "<td>default</td>" in panel.summary.value
    assert panel.chart.outputs and panel.chart.outputs[0]["data"]["image/png"]
    assert list(panel.checkpoint.options) == ["run-a/step-000004"]
    samples = service.samples(default_run, "run-a/step-000004")
    shown = samples["gained"] + samples["lost"]
    assert shown, "a LoRA with random weights changes some completions"
    for r in shown:
        assert html.escape(r["expected"]) in panel.samples.value
    panel.metric.value = "exact_match"
    assert "by exact_match" in panel.chart.outputs[0]["data"]["text/plain"]


def test_best_by_edit_similarity_marks_the_scoreboards_pick(home, default_run):
    report = evaluate_run(home, default_run, 5, best_by="edit_similarity")
    tuned = {m["lora"]: m["overall"]["edit_similarity"] for m in report["models"] if m["lora"]}
    assert set(tuned) == {"run-a/step-000004", "run-a/step-000008"}
    best = read_json(home.run_dir(default_run) / "status.json")["best"]
    assert best["chosen_by"] == "edit_similarity"
    assert tuned[f"run-a/{best['checkpoint']}"] == max(tuned.values())


def test_a_finished_run_scores_its_best_checkpoint_unless_turned_off(home, default_run):
    path = home.run_dir(default_run)
    settings = read_json(path / "settings.json")
    atomic_write_json(path / "settings.json", {**settings, "finetune": {"eval_cursors": 0}})
    assert after_run(path) is None and not (path / "eval.json").exists()
    atomic_write_json(path / "settings.json", {**settings, "finetune": {"eval_cursors": 5}})
    report = after_run(path)
    assert [m["lora"] for m in report["models"]] == [None, "run-a/step-000004"]
    assert (path / "eval.json").is_file() and "scoreboard over 5 held-out cursors" in (path / "log.txt").read_text()


def test_the_finetune_panel_shows_the_selected_runs_scoreboard(home, default_run):
    from refact_lab.finetune.runs import RunService
    from refact_lab.ui.finetune_panel import FinetunePanel

    evaluate_run(home, default_run, 5)
    panel = FinetunePanel(RunService(home), poll_s=0)
    try:
        assert panel.runs.value == default_run
        assert panel.scoreboard.widget in panel.widget.children[2].children
        assert "default+run-a/step-000004" in panel.scoreboard.summary.value and panel.scoreboard.chart.outputs
    finally:
        panel.close()


def test_a_run_of_a_model_in_a_local_folder_is_scored_on_that_model(home, stdlib_eval_project, tmp_path):
    """status.json names the base model by its folder's name only ("my model"): scoring must load the folder the
    run's settings name, not look that display name up (it used to fail with "unknown model")."""
    import shutil

    from refact_lab.finetune.runs import update_status
    from refact_lab.models.registry import EMBEDDED_DIR
    from tests.serve.helpers import make_run

    folder = tmp_path / "my model"
    shutil.copytree(EMBEDDED_DIR, folder)
    make_run(home, "run-local", folder, [4], [1.0], seed=5)
    update_status(home.run_dir("run-local"), project=stdlib_eval_project)
    assert read_json(home.run_dir("run-local") / "status.json")["model"] == "my model"
    report = evaluate_run(home, "run-local", 3)
    assert [m["lora"] for m in report["models"]] == [None, "run-local/step-000004"]
