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
    log = runs.log_tail(home, run_id, 100)
    assert "run failed" in log and "Traceback" in log


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
