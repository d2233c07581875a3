"""Fine-tuning and export with the input a new user brings: a model in a folder named with accents, damaged
checkpoints, signals at odd moments, a launched run whose process outlives its training."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from refact_lab.cli import main
from refact_lab.finetune import runs
from refact_lab.home import check_name
from tests.finetune.conftest import quick_settings


def _trained_run(home, project, model_dir, **changes) -> str:
    """A finished run trained in this process, a checkpoint at every step (2 steps unless `changes` say)."""
    settings = quick_settings(**{"train_steps": 2, "eval_every": 1, "checkpoint_every": 1, "warmup_steps": 0,
                                 "eval_cursors": 0, **changes})
    run_id = runs.create_run(home, project, str(model_dir), settings)
    assert runs.execute_run(home.run_dir(run_id), log=lambda m: None) is not None
    return run_id


def test_a_model_folder_named_with_accents_gives_a_usable_run_id(home, stdlib_project, learnable_model_dir,
                                                                 tmp_path):
    # "é".isalnum() is true, so the run id kept it, and every later step refused the id as a folder name
    assert check_name(runs.new_run_id("modèle à café"), "run id")
    import shutil

    folder = tmp_path / "modèles de l'équipe" / "petit modèle"
    shutil.copytree(learnable_model_dir, folder)
    run_id = runs.create_run(home, stdlib_project, str(folder), quick_settings(eval_cursors=0))
    assert run_id.startswith("petit-mod") and runs.read_status(home, run_id)["state"] == "queued"


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_an_export_refuses_a_damaged_checkpoint_and_writes_nothing(fmt, home, stdlib_project, learnable_model_dir,
                                                                   tmp_path, capsys):
    run_id = _trained_run(home, stdlib_project, learnable_model_dir)
    weights = home.run_dir(run_id) / "checkpoints" / "step-000002" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:     # a copy cut short: the header lists tensors the file no longer holds
        f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "export"
    capsys.readouterr()
    rc = main(["export", "--run", run_id, "--checkpoint", "step-000002", "--format", fmt, "--out", str(out),
               "--home", str(home.root)])
    err = capsys.readouterr().err
    # before: the merge ended in a safetensors traceback; a PEFT export copied the damaged file
    assert rc == 2 and "step-000002 is damaged" in err and "adapter_model.safetensors" in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the sound checkpoint beside it still exports
    assert main(["export", "--run", run_id, "--checkpoint", "step-000001", "--format", fmt, "--out", str(out),
                 "--home", str(home.root)]) == 0
    assert (out / ("model.safetensors" if fmt == "merged" else "adapter_model.safetensors")).is_file()


def test_resume_from_a_damaged_checkpoint_fails_naming_it(home, stdlib_project, learnable_model_dir):
    run_id = _trained_run(home, stdlib_project, learnable_model_dir)
    path = home.run_dir(run_id)
    # the latest checkpoint keeps the optimizer state a resume needs; its file is cut short
    state = path / "checkpoints" / "step-000002" / "trainer_state.pt"
    assert state.is_file()
    state.write_bytes(state.read_bytes()[:1000])
    runs.update_status(path, state="stopped")   # as if stopped at its last step
    runs.resume_run(home, run_id, detach=False)
    assert runs.execute_run(path, log=lambda m: runs.append_log(path, m)) is None
    status = runs.read_status(home, run_id)
    # before: torch's "PytorchStreamReader failed reading zip archive", naming no checkpoint or way out
    assert status["state"] == "failed"
    assert "checkpoint step-000002 cannot be resumed" in status["error"] and "move" in status["error"]


def test_one_line_of_an_interrupt_says_what_happened():
    line = runs.one_line(KeyboardInterrupt())
    assert line != "KeyboardInterrupt" and "interrupted" in line and "resume" in line


@pytest.mark.slow
def test_sigint_to_the_run_process_stops_it_cleanly(home, stdlib_project, learnable_model_dir):
    service = runs.RunService(home)
    run_id = service.start(stdlib_project, str(learnable_model_dir),
                           quick_settings(train_steps=200, eval_every=2, checkpoint_every=2, eval_cursors=0))
    deadline = time.time() + 120
    while (service.status(run_id).get("step") or 0) < 1:
        assert time.time() < deadline and service.status(run_id)["state"] in runs.ACTIVE, service.log_tail(run_id)
        time.sleep(0.05)
    os.kill(service.status(run_id)["worker_pid"], signal.SIGINT)
    done = service.wait(run_id, timeout=120)
    # before: the run failed with the error "KeyboardInterrupt" and a traceback, its last steps lost
    assert done["state"] == "stopped", service.log_tail(run_id, 30)
    assert done["step"] < 200 and service.checkpoints(run_id)[-1]["step"] == done["step"]


class _LingeringProcess:
    """A launched run's process that is still at work after its status says finished (the scoreboard of the
    best checkpoint runs in the worker), for longer than any fixed wait: it exits after a few polls."""

    def __init__(self, polls: int = 4):
        self.polls, self.pid = polls, os.getpid()

    def poll(self):
        self.polls -= 1
        return 0 if self.polls < 0 else None

    def wait(self, timeout=None):
        if self.polls >= 0:
            raise subprocess.TimeoutExpired("worker", timeout)
        return 0


def test_following_a_launched_run_waits_for_its_scoreboard(home, stdlib_project, learnable_model_dir, capsys):
    from refact_lab.cli import _follow_launched

    run_id = _trained_run(home, stdlib_project, learnable_model_dir)
    runs.append_log(home.run_dir(run_id), "scoreboard over 4 held-out cursors: tiny")
    capsys.readouterr()
    # before: TimeoutExpired escaped as a traceback once the scoreboard took longer than 60 s
    assert _follow_launched(home, run_id, _LingeringProcess()) == 0
    out, err = capsys.readouterr()
    assert f"{run_id}: finished at step 2/2" in out and "scoreboard over 4" in err


@pytest.mark.slow
def test_sigterm_to_a_foreground_finetune_stops_it_cleanly(home, stdlib_project, learnable_model_dir):
    import sys

    sets = [f"--set={k}={v}" for k, v in dict(seq_len=128, batch_size=4, train_steps=300, eval_every=2,
                                               checkpoint_every=2, max_test_rows=4, eval_cursors=0).items()]
    proc = subprocess.Popen([sys.executable, "-m", "refact_lab.cli", "finetune", "--home", str(home.root), "--model",
                             str(learnable_model_dir), "--project", stdlib_project, *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        while not (listed := runs.list_runs(home)) or (listed[0].get("step") or 0) < 1:
            assert time.time() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)     # `timeout`, a cancelled CI job
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    status = runs.list_runs(home)[0]
    # before: the process died at once and the run read as failed ("ended without finishing")
    assert proc.returncode == 0 and status["state"] == "stopped", (proc.returncode, status)
    assert "stopped at step" in out and runs.list_checkpoints(home, status["run_id"])[-1]["step"] == status["step"]


def test_a_damaged_accepted_list_skips_the_bad_records(home, stdlib_project):
    from refact_lab.finetune.dataset import accepted_path, load_dataset

    path = accepted_path(home, stdlib_project)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "[1, 2]", "7", *lines[1:]]) + "\n")
    # before: AttributeError: 'list' object has no attribute 'get', and the run failed with that
    ds = load_dataset(home, stdlib_project)
    assert len(ds.train) + len(ds.test) == len(lines)
    assert sorted(ds.skipped) == ["7: a record that is not a JSON object", "[1, 2]: a record that is not a JSON object"]


def test_a_checkpoint_save_that_fails_leaves_no_partial_folder(tmp_path):
    from refact_lab.finetune.trainer import _save_checkpoint

    class FullDisk:
        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"\0" * 4096)   # part of it got written
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _save_checkpoint(tmp_path, 4, FullDisk(), None, None, {}, {}, {})
    # before: checkpoints/.tmp-step-000004 stayed behind, holding on to the space it took
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_damaged_checkpoint_metrics_file_does_not_break_the_listing(home, stdlib_project, learnable_model_dir,
                                                                    tmp_path, capsys):
    from refact_lab.finetune import checkpoints

    run_id = _trained_run(home, stdlib_project, learnable_model_dir)
    folder = home.run_dir(run_id) / "checkpoints"
    (folder / "step-000001" / "metrics.json").write_text("[1]")
    (folder / "step-000002" / "metrics.json").write_text('{"step": "two", "test_loss": "low"}')
    # before: AttributeError / TypeError out of every listing (serving's choice of LoRA, deploy, export)
    [run] = checkpoints.list_runs(home)
    assert [(c.name, c.step, c.test_loss) for c in run.checkpoints] == [("step-000001", None, None),
                                                                      ("step-000002", None, None)]
    assert checkpoints.select(home, "latest", run_id).name == "step-000002"
    assert [c["name"] for c in runs.list_checkpoints(home, run_id)] == ["step-000001", "step-000002"]
    capsys.readouterr()
    assert main(["export", "--run", run_id, "--out", str(tmp_path / "out"), "--home", str(home.root)]) == 0, \
        capsys.readouterr().err


def test_a_save_cut_short_by_a_kill_is_cleaned_up_by_the_next_save(tmp_path):
    from refact_lab.finetune.trainer import _save_checkpoint

    class Adapter:
        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"weights")

    class Stateful:
        def state_dict(self):
            return {}

    leftover = tmp_path / "checkpoints" / ".tmp-step-000002"      # a kill -9 in the middle of saving step 2
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    saved = _save_checkpoint(tmp_path, 3, Adapter(), Stateful(), Stateful(), {"step": 3}, {}, {"step": 3})
    # before: the half-written folder stayed for good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [saved.name] == ["step-000003"]


def test_an_archive_that_fails_midway_leaves_no_truncated_zip(home, stdlib_project, learnable_model_dir, tmp_path,
                                                              monkeypatch):
    import zipfile

    from refact_lab.finetune.export import export_archive

    run_id = _trained_run(home, stdlib_project, learnable_model_dir)
    downloads = tmp_path / "downloads"
    real_write, written = zipfile.ZipFile.write, []

    def disk_fills_up(self, filename, *args, **kwargs):
        if written:
            raise OSError(28, "No space left on device")
        written.append(filename)
        return real_write(self, filename, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        export_archive(home, run_id, "best", "peft", downloads)
    # before: the .zip was written in place, and a truncated one stayed for the download button to offer
    assert written and list(downloads.iterdir()) == []


def test_a_resume_that_cannot_launch_is_failed_not_left_queued(home, stdlib_project, learnable_model_dir,
                                                              monkeypatch):
    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir), quick_settings(eval_cursors=0))
    runs.update_status(home.run_dir(run_id), state="stopped")
    service = runs.RunService(home)

    def no_process(*args, **kwargs):
        raise OSError("Too many open files")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(OSError):
        service.resume(run_id)
    # before: queued and owned by this (live) process for good: not started, not failed, not resumable
    status = service.status(run_id)
    assert status["state"] == "failed" and status["error"] == "could not start: OSError: Too many open files"
    assert runs.log_tail(home, run_id).count("could not start") == 1
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="is failed, not running"):
        service.stop(run_id)


def test_ctrl_c_while_a_launched_run_finishes_its_scoreboard_stops_only_the_following(
        home, stdlib_project, learnable_model_dir, capsys):
    from refact_lab.cli import _follow_launched

    run_id = _trained_run(home, stdlib_project, learnable_model_dir)

    class ScoringForLong(_LingeringProcess):
        def poll(self):
            self.polls -= 1
            if self.polls < 0:
                raise KeyboardInterrupt      # Ctrl-C while the status already says finished
            return None

    capsys.readouterr()
    assert _follow_launched(home, run_id, ScoringForLong(polls=3)) == 0
    assert f"{run_id}: finished at step 2/2" in capsys.readouterr().out
    assert not (home.run_dir(run_id) / runs.STOP_FLAG).exists()   # nothing asked a finished run to stop
