"""Runs as processes: clean stop, SIGKILL -> failed with its log, resume from the last checkpoint, listing."""

import os
import signal
import time

import pytest

from refact_lab.finetune import runs
from refact_lab.finetune.runs import RunService
from refact_lab.home import pid_alive, proc_start_ticks
from tests.finetune.conftest import quick_settings


def _wait_for(predicate, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_stop_kill_and_resume_a_run_process(home, stdlib_project, learnable_model_dir):
    service = RunService(home)
    # long enough that the kill surely lands mid-way (status is written at most once a second)
    settings = quick_settings(train_steps=60, eval_every=3, checkpoint_every=3)
    run_id = service.start(stdlib_project, str(learnable_model_dir), settings)
    path = home.run_dir(run_id)
    first_pid = service.status(run_id)["pid"]
    assert first_pid and first_pid != os.getpid()        # a process of its own

    # 1. a clean stop: at the next step boundary it writes a checkpoint and ends as "stopped"
    _wait_for(lambda: service.status(run_id).get("step", 0) >= 1, what="the first step")
    service.stop(run_id)
    stopped = service.wait(run_id, timeout=120)
    assert stopped["state"] == "stopped", service.log_tail(run_id)
    ckpts = service.checkpoints(run_id)
    assert ckpts and ckpts[-1]["step"] == stopped["step"] < 60
    assert (path / "checkpoints" / ckpts[-1]["name"] / "trainer_state.pt").is_file()
    assert not (path / runs.STOP_FLAG).exists()
    assert "stopped at step" in service.log_tail(run_id)
    stop_step = stopped["step"]

    # 2. resume, then kill the process mid-way (SIGKILL: no chance to write anything)
    service.resume(run_id)

    def past_a_new_checkpoint():
        status, ckpts = service.status(run_id), service.checkpoints(run_id)
        newest = ckpts[-1]["step"] if ckpts else 0
        return status if status["state"] == "running" and stop_step < newest < status.get("step", 0) else None

    status = _wait_for(past_a_new_checkpoint, what="training past a new checkpoint")
    killed_pid = status["pid"]
    os.kill(killed_pid, signal.SIGKILL)
    # a reader without any handle on the process (a new service, a reloaded page) sees it failed
    failed = _wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(runs.read_status(home, run_id)),
                       timeout=10, what="failed state")
    assert f"pid {killed_pid}" in failed["error"] and "ended without finishing" in failed["error"]
    log = RunService(home).log_tail(run_id, 200)
    assert "step 0: test loss" in log and "resumed from" in log and "ended without finishing" in log
    last_good = runs.list_checkpoints(home, run_id)[-1]["step"]
    assert stop_step < last_good < 60

    # 3. resume again: continues from the last checkpoint and finishes
    service.resume(run_id)
    done = service.wait(run_id, timeout=180)
    assert done["state"] == "finished", service.log_tail(run_id, 60)
    assert done["step"] == done["total"] == 60 and done["error"] is None
    assert f"resumed from step-{last_good:06d}" in service.log_tail(run_id, 200)
    metrics = service.metrics(run_id)
    train_steps = [m["step"] for m in metrics if m["kind"] == "train"]
    assert train_steps == list(range(1, 61))               # each step once: no duplicates from the re-done steps
    assert [m["step"] for m in metrics if m["kind"] == "test"][0] == 0
    best = done["best"]
    ckpts = service.checkpoints(run_id)
    assert [c["name"] for c in ckpts if c["best"]] == [best["checkpoint"]]
    assert best["test_loss"] == min(c["test_loss"] for c in ckpts)
    # optimizer state is kept only where a resume needs it: the latest checkpoint
    assert [c["name"] for c in ckpts if (path / "checkpoints" / c["name"] / "trainer_state.pt").exists()] == \
        [ckpts[-1]["name"]]
    with pytest.raises(RuntimeError, match="only a stopped or failed run can be resumed"):
        service.resume(run_id)
    listed = runs.list_runs(home)
    assert [(r["run_id"], r["state"]) for r in listed] == [(run_id, "finished")]


def test_a_run_that_fails_keeps_its_log_and_error(home, stdlib_project, learnable_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken_model"
    shutil.copytree(learnable_model_dir, broken)
    run_id = runs.create_run(home, stdlib_project, str(broken), quick_settings())
    (broken / "model.safetensors").unlink()               # the weights vanish before the run starts
    assert runs.execute_run(home.run_dir(run_id), log=lambda m: runs.append_log(home.run_dir(run_id), m)) is None
    status = runs.read_status(home, run_id)
    assert status["state"] == "failed" and status["error"]
    assert len(status["error"].splitlines()) == 1 and "Traceback" not in status["error"]
    log = runs.log_tail(home, run_id, 100)
    # the one-line reason comes first, the traceback (for debugging) after it
    reason = log.index(f"run failed: {status['error']}")
    assert "Traceback" in log and reason < log.index("Traceback")


def test_bad_inputs_are_refused_before_anything_starts(home, stdlib_project, learnable_model_dir):
    service = RunService(home)
    with pytest.raises(ValueError, match="unknown model"):
        service.start(stdlib_project, "no-such-model", quick_settings())
    with pytest.raises(FileNotFoundError, match="no scanned dataset"):
        service.start("empty", str(learnable_model_dir), quick_settings())
    assert runs.list_runs(home) == []


def test_pid_liveness_sees_a_zombie_as_dead():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = proc_start_ticks(proc.pid)
    _wait_for(lambda: not pid_alive(proc.pid, start), timeout=10, what="the child to end")
    assert pid_alive(os.getpid(), proc_start_ticks(os.getpid()))
    assert not pid_alive(os.getpid(), 1)            # same pid, another start time: a recycled pid


def test_preview_shows_the_schedule_the_run_then_uses(home, stdlib_project, learnable_model_dir):
    from refact_lab.config import FinetuneSettings

    service = RunService(home)
    settings = FinetuneSettings(seq_len=128, batch_size=4, epochs=0.1, max_test_rows=4, eval_every=100)
    shown = service.preview(stdlib_project, str(learnable_model_dir), settings)
    assert shown["schedule"]["train_steps"] == 16                 # 0.1 x 155 steps per epoch, rounded up
    assert "train_steps auto" in shown["explanation"] and "155 steps per epoch" in shown["explanation"]
    # a schedule-only change is answered from the remembered data, and agrees with a fresh computation
    bigger = FinetuneSettings(seq_len=128, batch_size=8, epochs=0.1, max_test_rows=4, eval_every=100)
    assert service.preview(stdlib_project, str(learnable_model_dir), bigger)["schedule"] == \
        runs.preview(home, stdlib_project, str(learnable_model_dir), bigger)["schedule"]
    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir), settings)
    runs.execute_run(home.run_dir(run_id), log=lambda m: None)
    status = runs.read_status(home, run_id)
    assert status["state"] == "finished" and status["schedule"] == shown["schedule"] and status["step"] == 16


def _kill_creator_after_create_run(home, project, model, settings) -> str:
    """A process that creates a run and is SIGKILLed before it starts it (a closed kernel, a killed CLI)."""
    import subprocess
    import sys

    code = ("import sys, time, json\n"
            "from refact_lab.config import FinetuneSettings\n"
            "from refact_lab.finetune import runs\n"
            "from refact_lab.home import Home\n"
            "settings = FinetuneSettings(**json.loads(sys.argv[4]))\n"
            "print(runs.create_run(Home.resolve(sys.argv[1]), sys.argv[2], sys.argv[3], settings), flush=True)\n"
            "time.sleep(600)\n")
    import dataclasses
    import json

    proc = subprocess.Popen([sys.executable, "-c", code, str(home.root), project, model,
                             json.dumps(dataclasses.asdict(settings))], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id, "the creator printed no run id"
    proc.kill()
    proc.wait()
    proc.stdout.close()
    return run_id


def test_a_queued_run_whose_creator_was_killed_is_failed_and_resumable(home, stdlib_project, learnable_model_dir):
    run_id = _kill_creator_after_create_run(home, stdlib_project, str(learnable_model_dir),
                                            quick_settings(train_steps=2))
    service = RunService(home)
    status = service.status(run_id)
    assert status["state"] == "failed" and "ended before the run started" in status["error"]
    assert "ended before the run started" in service.log_tail(run_id)
    with pytest.raises(RuntimeError, match="is failed, not running"):
        service.stop(run_id)
    service.resume(run_id)
    done = service.wait(run_id, timeout=120)
    assert done["state"] == "finished" and done["step"] == 2 and done["error"] is None, service.log_tail(run_id)


def test_a_queued_run_with_a_live_creator_stays_queued(home, stdlib_project, learnable_model_dir):
    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir), quick_settings())
    status = runs.read_status(home, run_id)
    assert status["state"] == "queued" and status["pid"] == os.getpid()


def test_a_run_that_cannot_be_launched_is_failed_not_queued(home, stdlib_project, learnable_model_dir,
                                                            monkeypatch):
    import subprocess

    def no_process(*args, **kwargs):
        raise OSError("Too many open files")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(OSError):
        RunService(home).start(stdlib_project, str(learnable_model_dir), quick_settings())
    [status] = runs.list_runs(home)
    assert status["state"] == "failed" and status["error"] == "could not start: OSError: Too many open files"


def test_a_queued_run_without_any_owner_is_failed_after_the_grace_period(home, stdlib_project,
                                                                         learnable_model_dir):
    """A run folder written before owners were recorded: queued, no pid."""
    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir), quick_settings())
    path = home.run_dir(run_id)
    runs.update_status(path, pid=None, pid_started=None, created_at=time.time() - 30)
    assert runs.read_status(home, run_id)["state"] == "queued"        # just created: it may still start
    runs.update_status(path, created_at=time.time() - runs.UNOWNED_QUEUED_GRACE_S - 1)
    assert runs.read_status(home, run_id)["state"] == "failed"


def test_a_set_seq_len_the_model_cannot_take_is_refused_before_a_run_exists(home, stdlib_project,
                                                                            learnable_model_dir):
    from refact_lab.config import SettingsError

    with pytest.raises(SettingsError, match=r"seq_len: 1024 is longer than the model's context \(512 tokens\)"):
        RunService(home).start(stdlib_project, str(learnable_model_dir), quick_settings(seq_len=1024))
    assert runs.list_runs(home) == []


def test_context_rate_reaches_the_training_data(home, stdlib_project, learnable_model_dir):
    """`context_rate` changes what the trainer packs (files with context are cut into smaller windows, so more
    tokens and steps), and the preview does not answer it from the data remembered for another rate."""
    from refact_lab.config import FinetuneSettings

    service = RunService(home)
    plain = FinetuneSettings(seq_len=128, batch_size=4, epochs=0.1, max_test_rows=4, eval_every=100)
    with_context = FinetuneSettings(seq_len=128, batch_size=4, epochs=0.1, max_test_rows=4, eval_every=100,
                                    context_rate=1.0)
    a = service.preview(stdlib_project, str(learnable_model_dir), plain)
    b = service.preview(stdlib_project, str(learnable_model_dir), with_context)
    assert b["train_tokens"] > a["train_tokens"]
    assert b == runs.preview(home, stdlib_project, str(learnable_model_dir), with_context)
