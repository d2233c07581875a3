"""The Fine-tune panel without a browser: set widget values, click, and check what the run service did."""

import time

import pytest

from refact_lab.config import FinetuneSettings, field_specs
from refact_lab.finetune.runs import RunService
from refact_lab.ui.finetune_panel import FinetunePanel

FORM = {"seq_len": 128, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "max_test_rows": 8, "lora_r": 8,
        "learning_rate": 0.01, "lora_dropout": 0.0}


def _wait_for(predicate, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _fill(panel, model_dir, project, **values):
    panel.model.value = str(model_dir)
    panel.reload_choices()
    panel.dataset.value = project
    for name, value in {**FORM, **values}.items():
        field = panel.fields[name]
        if field.auto is not None:
            field.auto.value = value is None
        if value is not None:
            field.input.value = value


def test_form_is_built_from_the_settings_metadata(home):
    panel = FinetunePanel(RunService(home), poll_s=0)
    specs = field_specs(FinetuneSettings)
    assert list(panel.fields) == [s["name"] for s in specs]
    for spec in specs:
        field = panel.fields[spec["name"]]
        assert field.input.tooltip == spec["help"]
        if spec["type"] in (int, float) and not spec["choices"]:
            assert (field.input.min, field.input.max) == (spec["min"], spec["max"])
        assert (field.auto is not None) == spec["auto"]
    assert panel.fields["train_steps"].auto.value and panel.fields["train_steps"].input.disabled
    assert panel.settings() == FinetuneSettings()          # the untouched form is the defaults
    assert "No scanned dataset yet" in (panel.update_preview() or panel.auto_numbers.value)


def test_invalid_form_shows_the_message_and_starts_nothing(home, stdlib_project, learnable_model_dir):
    service = RunService(home)
    panel = FinetunePanel(service, poll_s=0)
    _fill(panel, learnable_model_dir, stdlib_project, train_steps=5, warmup_steps=5)
    panel.start_button.click()
    assert "warmup_steps: 5 must be smaller than train_steps 5" in panel.message.value
    assert service.runs() == []


@pytest.mark.slow
def test_preview_start_stop_resume_and_the_live_plot(home, stdlib_project, learnable_model_dir):
    service = RunService(home)
    panel = FinetunePanel(service, poll_s=0.3)
    try:
        _fill(panel, learnable_model_dir, stdlib_project)
        preview = panel.update_preview()
        auto_steps = preview["schedule"]["train_steps"]
        # "auto" shows its numbers before the start, in the form and in words
        assert panel.fields["train_steps"].input.value == auto_steps
        assert f"{auto_steps:,} steps" in panel.auto_numbers.value and "steps per epoch" in panel.auto_numbers.value

        _fill(panel, learnable_model_dir, stdlib_project, train_steps=30)
        panel.start_button.click()
        assert "Started run" in panel.message.value, panel.message.value
        [run] = service.runs()
        run_id = run["run_id"]
        saved = service.settings(run_id)
        assert saved["model"] == str(learnable_model_dir) and saved["project"] == stdlib_project
        assert {k: saved["finetune"][k] for k in FORM} == FORM and saved["finetune"]["train_steps"] == 30
        assert panel.runs.value == run_id

        _wait_for(lambda: (service.status(run_id).get("step") or 0) >= 1, what="the first step")
        panel.stop_button.click()
        _wait_for(lambda: service.status(run_id)["state"] == "stopped", what="stopped")
        stopped_at = service.status(run_id)["step"]
        assert stopped_at < 30
        # the polling thread, not the test, brings the view up to date
        _wait_for(lambda: not panel.resume_button.disabled, timeout=10, what="resume enabled")
        panel.resume_button.click()
        _wait_for(lambda: service.status(run_id)["state"] == "finished", what="finished")
        _wait_for(lambda: "train loss: 30 points" in panel.plot_caption.value, timeout=10, what="plot redrawn")
        _wait_for(lambda: "finished" in panel.progress_text.value, timeout=10, what="progress updated")
    finally:
        panel.close()
    assert panel.progress.value == panel.progress.max == 30
    assert "finished" in panel.progress_text.value
    assert panel.plot.outputs[0]["data"]["image/png"]            # a picture, not a figure's repr
    assert "test loss: " in panel.plot_caption.value
    best = service.status(run_id)["best"]["checkpoint"]
    assert f"<td>{best}</td>" in panel.checkpoints.value and "★ best" in panel.checkpoints.value
    assert panel.checkpoints.value.count("★ best") == 1
    assert "step 0: test loss" in panel.log.value and f"resumed from step-{stopped_at:06d}" in panel.log.value
    assert panel.resume_button.disabled and panel.stop_button.disabled


def test_a_reloaded_panel_shows_the_same_run(home, stdlib_project, learnable_model_dir):
    """A browser reload builds a new panel: it rereads the run folder and shows the same curve."""
    from refact_lab.finetune import runs

    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir),
                             FinetuneSettings(**FORM, train_steps=3))
    runs.execute_run(home.run_dir(run_id), log=lambda m: None)
    panel = FinetunePanel(RunService(home), poll_s=0)
    assert panel.runs.value == run_id
    assert "train loss: 3 points" in panel.plot_caption.value
