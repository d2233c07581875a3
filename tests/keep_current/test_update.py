"""Update and retrain on a real git source: fetch, incremental rescan, training from the deployed adapter,
the scoreboard's judgement and the deploy gate; the deploy history and rollback; the update schedule."""

from __future__ import annotations

import json
import time

import pytest

from refact_lab.cli import main
from refact_lab.keep_current import deploys, schedule
from refact_lab.keep_current.update import EDIT_SIMILARITY_TOLERANCE, not_worse
from refact_lab.serve import state
from tests.finetune.conftest import STDLIB, TRAIN_FILES

pytest.importorskip("git")


def _update(home, project, capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["update", "--project", project, "--home", str(home.root), "--json", "--cursors", "10",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_update_fetches_retrains_from_the_deployed_adapter_judges_and_gates(home, upstream, deployed_run, capsys):
    from tests.data.conftest import commit

    first = state.load(home)[0].lora
    deployed_path = home.run_dir(deployed_run) / "checkpoints"
    commit(upstream, {"lib/extra.py": (STDLIB / TRAIN_FILES[12]).read_text(),
                      "lib/" + TRAIN_FILES[0]: (STDLIB / TRAIN_FILES[0]).read_text() + "\n# changed\n"}, "more")

    out = _update(home, "proj", capsys)

    assert set(out) >= {"changed_files", "run", "deployed", "reason", "before", "after"}
    assert out["changed_files"] == 2                       # one added, one modified; the rest from the cache
    assert out["scan"]["files_read"] == 2
    run = out["run"]
    settings = json.loads((home.run_dir(run) / "settings.json").read_text())
    assert settings["init_adapter"].startswith(str(deployed_path))
    assert "LoRA weights initialised from adapter" in (home.run_dir(run) / "log.txt").read_text()
    for side in ("before", "after"):
        assert 0.0 <= out[side]["edit_similarity"] <= 1.0 and "exact_match" in out[side]
    # the deployed and the new checkpoint were judged on the same cursors, in one scoreboard
    latest = json.loads((home.project_dir("proj") / "eval" / "latest.json").read_text())
    assert latest["cursors"] == 10 and len(latest["models"]) == 3
    assert out["compared_with"] == out["init_adapter"] and out["init_adapter"].startswith(deployed_run + "/")
    assert out["deployed"] == not_worse(out["before"], out["after"])[0]
    now = state.load(home)[0].lora
    if out["deployed"]:
        assert (now.run_id, now.checkpoint) == tuple(out["checkpoint"].split("/"))
        assert [e["by"] for e in deploys.history(home, "proj")] == ["deploy", "update"]
    else:
        assert now == first and out["reason"].startswith(("edit similarity fell", "exact match fell"))

    # nothing new upstream: no training, nothing deployed
    runs_before = sorted(p.name for p in home.runs_dir.iterdir())
    again = _update(home, "proj", capsys)
    assert again["changed_files"] == 0 and again["run"] is None and again["deployed"] is False
    assert again["reason"] == "no changes"
    assert sorted(p.name for p in home.runs_dir.iterdir()) == runs_before


def test_the_gate_deploys_only_what_is_not_worse():
    before = {"edit_similarity": 0.600, "exact_match": 0.30}
    assert not_worse(before, {"edit_similarity": 0.600 - EDIT_SIMILARITY_TOLERANCE, "exact_match": 0.30})[0]
    assert not_worse(before, {"edit_similarity": 0.700, "exact_match": 0.40})[0]
    ok, why = not_worse(before, {"edit_similarity": 0.590, "exact_match": 0.40})
    assert not ok and "edit similarity fell from 0.600 to 0.590" in why
    ok, why = not_worse(before, {"edit_similarity": 0.650, "exact_match": 0.20})
    assert not ok and "exact match fell" in why


def test_history_lists_deploys_and_rollback_restores_the_previous_choice(home, capsys, tiny_model_dir):
    from refact_lab.finetune.runs import update_status
    from tests.serve.helpers import make_run

    for run_id in ("run-a", "run-b"):
        make_run(home, run_id, tiny_model_dir, [2], [1.0])
        update_status(home.run_dir(run_id), project="proj")
    deploys.deploy(home, "run-a", by="deploy")
    deploys.deploy(home, "run-b/step-000002", by="update", scores={"edit_similarity": 0.5, "exact_match": 0.1})
    assert state.load(home)[0].lora.run_id == "run-b"

    capsys.readouterr()
    assert main(["update", "--project", "proj", "--home", str(home.root), "--history"]) == 0
    listed = capsys.readouterr().out
    assert "run-a/step-000002" in listed and "run-b/step-000002" in listed and "edit sim 0.500" in listed

    assert main(["update", "--project", "proj", "--home", str(home.root), "--rollback", "1"]) == 0
    choice = state.load(home)[0].lora
    assert (choice.mode, choice.run_id, choice.checkpoint) == ("checkpoint", "run-a", "step-000002")
    entries = deploys.history(home, "proj")
    assert [e["by"] for e in entries] == ["deploy", "update", "rollback"] and entries[-1]["note"] == "rollback to deploy 1"
    assert main(["update", "--project", "proj", "--home", str(home.root), "--rollback", "9"]) == 2


def test_the_deploy_service_records_its_deploys(home, tiny_model_dir):
    from refact_lab.finetune.runs import update_status
    from refact_lab.serve.deploy import DeployService
    from tests.serve.helpers import make_run

    make_run(home, "run-a", tiny_model_dir, [2], [1.0])
    update_status(home.run_dir("run-a"), project="proj")
    DeployService(home, inference=object()).deploy("run-a")
    assert [e["checkpoint"] for e in deploys.history(home, "proj")] == ["run-a/step-000002"]


def test_due_follows_the_schedule_with_a_fake_clock():
    from refact_lab.config import SettingsError, UpdateSchedule

    day = UpdateSchedule(every_hours=24, project="p")
    now = 1_000_000.0
    assert not schedule.due(UpdateSchedule(), {"state": "idle"}, now)                   # off by default
    assert schedule.due(day, {"state": "idle"}, now)                                    # never ran
    assert not schedule.due(day, {"state": "finished", "started_at": now - 3600}, now)
    assert schedule.due(day, {"state": "failed", "started_at": now - 25 * 3600}, now)
    assert not schedule.due(day, {"state": "running", "started_at": now - 99 * 3600}, now)  # one at a time
    with pytest.raises(SettingsError):
        UpdateSchedule(every_hours=-1)


def test_tick_launches_once_and_not_again_while_it_runs(home):
    from refact_lab.config import UpdateSchedule

    launched = []

    def fake_launch(h, project):   # what launch leaves on disk: an active job owned by a live process
        launched.append(project)
        schedule._write(h, project, state="running", **schedule.owner_fields(), started_at=time.time())

    assert schedule.tick(home, start=fake_launch) is None                     # off: nothing
    schedule.save_schedule(home, UpdateSchedule(every_hours=6, project="proj"))
    assert schedule.tick(home, start=fake_launch) == "proj"
    assert schedule.tick(home, now=time.time() + 7 * 3600, start=fake_launch) is None   # still running
    schedule._write(home, "proj", state="finished")
    assert schedule.tick(home, now=time.time() + 3600, start=fake_launch) is None       # not due yet
    assert schedule.tick(home, now=time.time() + 7 * 3600, start=fake_launch) == "proj"
    assert launched == ["proj", "proj"]


def test_a_launched_update_is_a_job_with_status_one_at_a_time(home, scanned):
    from refact_lab.keep_current.service import UpdateService

    service = UpdateService(home, scanned)
    with pytest.raises(RuntimeError):
        service.stop()                                        # nothing running
    proc = schedule.launch(home, scanned)["proc"]
    with pytest.raises(RuntimeError, match="already"):
        service.start()                                       # one at a time
    assert proc.wait(300) == 0, service.log_tail()
    status = service.status()
    assert status["state"] == "finished" and status["result"]["reason"] == "no changes"
    assert "no changes" in service.summary()


def test_stop_flags_the_update_and_the_run_it_trains(home, deployed_run):
    schedule._write(home, "proj", state="running", **schedule.owner_fields(), run=deployed_run)
    schedule.stop(home, "proj")
    assert schedule.stop_requested(home, "proj") and (home.run_dir(deployed_run) / "stop").is_file()


def test_without_a_deployed_adapter_the_update_trains_fresh_and_compares_with_the_base_model(
        home, upstream, scanned, learnable_model_dir):
    from refact_lab.keep_current.update import run_update
    from tests.data.conftest import commit

    state.save(home, model=str(learnable_model_dir))            # the active model, as Model hosting sets it
    commit(upstream, {"lib/extra.py": (STDLIB / TRAIN_FILES[12]).read_text()}, "more")
    out = run_update(home, scanned, cursors=10, log=lambda m: None,
                     overrides=["train_steps=2", "seq_len=128", "batch_size=4", "eval_every=1", "checkpoint_every=1",
                                "lora_r=8", "lora_alpha=16", "max_test_rows=8", "learning_rate=0.01"])
    assert out["changed_files"] == 1 and out["init_adapter"] is None and out["compared_with"] == "base model"
    settings = json.loads((home.run_dir(out["run"]) / "settings.json").read_text())
    assert "init_adapter" not in settings
    assert "initialised from adapter" not in (home.run_dir(out["run"]) / "log.txt").read_text()
    latest = json.loads((home.project_dir(scanned) / "eval" / "latest.json").read_text())
    base = next(m for m in latest["models"] if m["lora"] is None)
    assert out["before"] == base["overall"] and len(latest["models"]) == 2
    assert out["deployed"] == not_worse(out["before"], out["after"])[0]


def test_an_unreachable_remote_is_a_clear_error_and_nothing_changes(home, upstream, scanned, capsys):
    import shutil

    accepted = (home.scan_dir(scanned) / "accepted.jsonl").read_text()
    shutil.rmtree(upstream.working_tree_dir)
    assert main(["update", "--project", scanned, "--home", str(home.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refact-lab: error: cannot fetch upstream") and "Traceback" not in err
    assert (home.scan_dir(scanned) / "accepted.jsonl").read_text() == accepted
    assert not home.runs_dir.is_dir() or not any(home.runs_dir.iterdir())


def test_the_update_services_import_neither_widgets_nor_torch():
    import subprocess
    import sys

    code = ("import sys, refact_lab.keep_current.update, refact_lab.keep_current.schedule, "
            "refact_lab.keep_current.service, refact_lab.keep_current.deploys; "
            "print(sorted(m for m in ('torch', 'ipywidgets') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_new_adapter_starts_from_the_saved_one_and_a_shape_mismatch_is_refused(tiny_model_dir, tmp_path):
    import torch

    from refact_lab.config import FinetuneSettings
    from refact_lab.finetune.lora import add_lora, load_adapter_weights
    from refact_lab.models.loading import load_model

    saved = add_lora(load_model(str(tiny_model_dir)), FinetuneSettings(lora_r=4), ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if ".lora_B." in name:
                p.normal_()                      # a trained adapter: B is no longer zero
    saved.save_pretrained(str(tmp_path / "adapter"))
    fresh = add_lora(load_model(str(tiny_model_dir)), FinetuneSettings(lora_r=4), ["q_proj", "v_proj"])
    load_adapter_weights(fresh, tmp_path / "adapter")
    want = {n: p for n, p in saved.named_parameters() if ".lora_" in n}
    got = dict(fresh.named_parameters())
    assert want and all(torch.equal(got[n], p) for n, p in want.items())
    other = add_lora(load_model(str(tiny_model_dir)), FinetuneSettings(lora_r=8), ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="does not match"):
        load_adapter_weights(other, tmp_path / "adapter")
