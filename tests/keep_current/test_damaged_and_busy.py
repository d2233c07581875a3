"""Hostile state for keep-current: damaged files beside a deploy, a damaged update status or schedule, and a
second update started while one is running. Each gets a clear outcome; none half-does its work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from refact_lab.cli import main
from refact_lab.config import UpdateSchedule
from refact_lab.keep_current import deploys, schedule
from refact_lab.keep_current.service import UpdateService
from refact_lab.serve import state


def test_a_damaged_eval_json_does_not_leave_a_deploy_without_its_history_line(home, tiny_model_dir):
    from refact_lab.finetune.runs import update_status
    from tests.serve.helpers import make_run

    make_run(home, "run-a", tiny_model_dir, [2], [1.0])
    update_status(home.run_dir("run-a"), project="proj")
    (home.run_dir("run-a") / "eval.json").write_text('{"models": [')   # a write cut off by a crash
    entry = deploys.deploy(home, "run-a", by="deploy")
    assert entry["checkpoint"] == "run-a/step-000002" and entry["scores"] is None   # "not evaluated"
    assert state.load(home)[0].lora.run_id == "run-a"
    assert [e["checkpoint"] for e in deploys.history(home, "proj")] == ["run-a/step-000002"]


@pytest.mark.parametrize("content", ["{bad", "[]", '{"state": "running", "pid": "x"}',
                                     '{"state": "finished", "started_at": "yesterday"}'])
def test_a_damaged_update_status_reads_as_failed_and_the_schedule_starts_afresh(home, content):
    schedule.save_schedule(home, UpdateSchedule(every_hours=6, project="proj"))
    d = schedule.job_dir(home, "proj")
    d.mkdir(parents=True)
    (d / "status.json").write_text(content)
    service = UpdateService(home, "proj")
    status = service.status()
    assert status["state"] == "failed" and "status.json" in status["error"]
    assert "status.json" in service.summary()
    launched = []
    assert schedule.tick(home, start=lambda h, p: launched.append(p)) == "proj" and launched == ["proj"]


@pytest.mark.parametrize("value", ["daily", [6], 6])
def test_a_schedule_of_the_wrong_shape_in_settings_is_off(home, value):
    home.update_settings(**{schedule.SETTINGS_KEY: value})
    assert schedule.load_schedule(home) == UpdateSchedule()
    assert UpdateService(home, "proj").schedule() == {"every_hours": 0, "project": "default"}
    assert schedule.tick(home, start=lambda h, p: pytest.fail("launched")) is None


@pytest.mark.parametrize("project", ["../x", "a/b", ""])
def test_a_schedule_for_a_project_that_is_no_folder_name_is_refused(home, project):
    from refact_lab.config import SettingsError

    with pytest.raises(SettingsError, match="project: invalid project"):
        UpdateSchedule(every_hours=6, project=project)
    # one already in settings.json (written by hand) reads as off, never a warning at every tick
    home.update_settings(**{schedule.SETTINGS_KEY: {"every_hours": 6, "project": project}})
    assert schedule.load_schedule(home) == UpdateSchedule()
    assert schedule.tick(home, start=lambda h, p: pytest.fail("launched")) is None


def test_a_second_update_is_refused_while_one_runs(home, capsys):
    (home.project_dir("proj") / "scan").mkdir(parents=True)
    # another update process, alive: what `refact-lab update` (from a terminal or the schedule) leaves on disk
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        schedule._write(home, "proj", state="running", **schedule.owner_fields(other.pid), started_at=time.time())
        before = (schedule.job_dir(home, "proj") / "status.json").read_text()
        capsys.readouterr()
        assert main(["update", "--project", "proj", "--home", str(home.root)]) == 1
        err = capsys.readouterr().err
        assert "already running" in err and str(other.pid) in err
        assert (schedule.job_dir(home, "proj") / "status.json").read_text() == before   # its status untouched
    finally:
        other.kill()
        other.wait()


def test_a_foreground_update_is_a_job_the_app_and_schedule_see(home, capsys, monkeypatch):
    """While `refact-lab update` runs in a terminal, the app shows it and neither the schedule nor Update now
    starts another; when it ends its status says how."""
    (home.project_dir("proj") / "scan").mkdir(parents=True)
    seen = {}

    def fake_update(h, project, **kw):
        seen["status"] = schedule.read_status(h, project)
        with pytest.raises(RuntimeError, match="already running"):
            schedule.launch(h, project)
        return {"changed_files": 0, "run": None, "deployed": False, "reason": "no changes"}

    from refact_lab.keep_current import update

    monkeypatch.setattr(update, "run_update", fake_update)
    assert main(["update", "--project", "proj", "--home", str(home.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reason"] == "no changes"
    assert seen["status"]["state"] == "running"
    assert schedule.read_status(home, "proj")["state"] == "finished"
