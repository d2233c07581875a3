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
        # "Stopping..." until the run is seen stopped; the polling thread may already have seen it stop
        message = panel.message.value
        assert f"Stopping {run_id}" in message or f"Run {run_id} stopped at step" in message, message
        _wait_for(lambda: service.status(run_id)["state"] == "stopped", what="stopped")
        stopped_at = service.status(run_id)["step"]
        assert stopped_at < 30
        # the polling thread, not the test, brings the view up to date
        _wait_for(lambda: not panel.resume_button.disabled, timeout=10, what="resume enabled")
        # "Stopping..." does not outlive the stop: it becomes what happened
        _wait_for(lambda: f"stopped at step {stopped_at}" in panel.message.value, timeout=10, what="stop settled")
        assert "Stopping" not in panel.message.value
        assert f"stopped by request at step {stopped_at} of 30" in panel.progress_text.value
        panel.resume_button.click()
        # "Resuming..." until the run is seen running; the click's own refresh may already see it running
        message = panel.message.value
        assert f"Resuming {run_id}" in message or f"Run {run_id} running" in message \
            or f"Run {run_id} finished" in message, message
        _wait_for(lambda: "Resuming" not in panel.message.value, what="resume settled")
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


def test_the_dataset_list_follows_a_finished_scan(home):
    """A scan that finishes while the Fine-tune tab is open: its dataset is listed and chosen, no reload."""
    import shutil

    from refact_lab.config import ScanSettings
    from refact_lab.data.service import ProjectService
    from tests.finetune.conftest import STDLIB

    projects = ProjectService(home)
    panel = FinetunePanel(RunService(home), projects=projects, poll_s=0)
    assert list(panel.dataset.options) == [] and panel.dataset.value is None
    code = home.root.parent / "code"
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py"):
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STDLIB / name, code / name)
    projects.add_folder(str(code))
    projects.run_scan(ScanSettings(lm_filter=False))
    assert list(panel.dataset.options) == [projects.project]
    assert panel.dataset.value == projects.project
    panel.close()
    assert projects._listeners == []                          # a closed panel stops listening


def test_reload_and_opening_the_tab_choose_a_dataset_when_none_was_chosen(home, stdlib_project):
    from tests.finetune.conftest import TRAIN_FILES, write_dataset

    panel = FinetunePanel(RunService(home), poll_s=0)
    assert panel.dataset.value == stdlib_project              # one dataset at creation: chosen
    panel.dataset.options = []
    panel.reload_button.click()
    assert panel.dataset.value == stdlib_project
    write_dataset(home, "other", {"train": TRAIN_FILES[:2]})  # scanned elsewhere (the CLI, another page)
    panel.on_show()
    assert list(panel.dataset.options) == sorted(["other", stdlib_project]) and panel.dataset.value == stdlib_project


def test_a_seq_len_the_model_cannot_take_is_one_line_in_the_panel(home, stdlib_project, learnable_model_dir):
    service = RunService(home)
    panel = FinetunePanel(service, poll_s=0)
    _fill(panel, learnable_model_dir, stdlib_project, seq_len=1024)
    panel.start_button.click()
    assert panel.last_error == ("seq_len: 1024 is longer than the model's context (512 tokens); use at most 512 "
                                "or auto")
    assert service.runs() == []


def test_a_finished_run_says_why_it_ended_and_the_log_opens_on_its_newest_lines(home, stdlib_project,
                                                                               learnable_model_dir):
    from refact_lab.finetune import runs

    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir), FinetuneSettings(**FORM))
    path = home.run_dir(run_id)
    for i in range(500):
        runs.append_log(path, f"log line {i}")
    reason = "stopped early at step 40 of 100: no lower test loss in 5 evaluations (early_stop_patience 5)"
    runs.update_status(path, state="finished", step=40, total=100, early_stopped=True, stop_reason=reason)
    panel = FinetunePanel(RunService(home), poll_s=0)
    assert reason in panel.progress_text.value
    assert panel.log.value.endswith("] log line 499</pre></div>") and "] log line 0\n" not in panel.log.value
    # the scrolling box is anchored at its bottom, so it opens on the newest lines
    assert "flex-direction:column-reverse" in panel.log.value

    runs.update_status(path, step=100, early_stopped=False, stop_reason=None)
    panel.refresh_run()
    assert "ran all its steps" in panel.progress_text.value and reason not in panel.progress_text.value


def test_a_schedule_the_dataset_cannot_give_is_refused_before_a_run_exists(home, stdlib_project,
                                                                          learnable_model_dir):
    """Warmup set longer than the auto number of steps is only known once the dataset is measured: the
    preview knows it, so Start refuses instead of starting a run that fails."""
    service = RunService(home)
    panel = FinetunePanel(service, poll_s=0)
    _fill(panel, learnable_model_dir, stdlib_project, train_steps=None, epochs=0.01, warmup_steps=50)
    panel.start_button.click()
    assert panel.last_error and panel.last_error.startswith("warmup_steps: 50 must be smaller than the")
    assert service.runs() == []
