"""Several training processes from what a user touches: `refact-lab finetune --processes 2 --cpu` and the
Fine-tune panel's device controls, and how such a run records, stops, resumes and fails (2 CPU processes
talking through gloo; the GPU path is scripts/gpu_checks.sh). One multi-process start per test: each one
imports torch twice on a shared CPU."""

import os
import signal

import pytest

from refact_lab.cli import main
from refact_lab.finetune import runs
from refact_lab.finetune.runs import RunService
from tests.finetune.test_runs import _wait_for

QUICK = {"seq_len": 128, "batch_size": 4, "learning_rate": 1e-2, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0,
         "max_test_rows": 8, "early_stop_patience": 0, "eval_cursors": 0, "precision": "fp32"}


def _cli(home, project, model, *extra, **settings):
    sets = [a for k, v in {**QUICK, **settings}.items() for a in ("--set", f"{k}={v}")]
    return main(["finetune", "--home", str(home.root), "--project", project, "--model", str(model), *extra, *sets])


def _only_run(home) -> str:
    listed = runs.list_runs(home)
    assert len(listed) == 1
    return listed[0]["run_id"]


@pytest.mark.slow
def test_two_cpu_processes_from_the_cli(home, stdlib_project, learnable_model_dir, capsys):
    code = _cli(home, stdlib_project, learnable_model_dir, "--processes", "2", "--cpu",
                train_steps=2, eval_every=1, checkpoint_every=2)
    run_id = _only_run(home)
    log = runs.log_tail(home, run_id, 200)
    assert code == 0, log
    status = runs.read_status(home, run_id)
    assert status["state"] == "finished" and status["world_size"] == 2 and status["step"] == 2
    launch = RunService(home).settings(run_id)["launch"]
    assert launch["processes"] == 2 and launch["cpu"] is True and launch["fsdp"] is False
    assert "launch: 2 processes on CPU (gloo)" in log and "x2" in log and "memory: needs about" in log
    assert "batch_size 4 is the global batch: 2 processes x 2 rows per step" in log
    metrics = runs.read_metrics(home, run_id)
    # only process 0 writes: each step once, not once per process
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2]
    assert [m["step"] for m in metrics if m["kind"] == "test"] == [0, 1, 2]
    ckpts = runs.list_checkpoints(home, run_id)
    assert ckpts[-1]["name"] == "step-000002" and sum(c["best"] for c in ckpts) == 1
    out = capsys.readouterr()
    assert f"{run_id}: finished at step 2/2" in out.out
    # in the foreground the run's log is shown as it grows, as with one process
    assert "launch: 2 processes on CPU (gloo)" in out.err and "step 2/2: train loss" in out.err


@pytest.mark.slow
def test_a_two_process_run_stops_and_resumes_like_one(home, stdlib_project, learnable_model_dir):
    assert _cli(home, stdlib_project, learnable_model_dir, "--processes", "2", "--cpu", "--detach",
                train_steps=12, eval_every=2, checkpoint_every=2) == 0
    run_id = _only_run(home)
    path = home.run_dir(run_id)
    # asked before its first step ends (steps of this tiny model take milliseconds): process 0 reads the flag
    # and every process leaves the loop at the same step boundary
    runs.request_stop(path)
    stopped = _wait_for(lambda: (lambda s: s if s["state"] not in runs.ACTIVE else None)(
        runs.read_status(home, run_id)), what="the stop")
    log = runs.log_tail(home, run_id, 200)
    assert stopped["state"] == "stopped" and stopped["step"] == 1 and stopped["world_size"] == 2, log
    assert runs.list_checkpoints(home, run_id)[-1]["step"] == stopped["step"]

    # `refact-lab resume` launches the same 2 processes again and follows them to the end
    assert main(["resume", run_id, "--home", str(home.root)]) == 0, runs.log_tail(home, run_id, 80)
    done = runs.read_status(home, run_id)
    assert done["state"] == "finished" and done["world_size"] == 2 and done["step"] == 12
    assert f"resumed from step-{stopped['step']:06d}" in runs.log_tail(home, run_id, 200)
    train = [m["step"] for m in runs.read_metrics(home, run_id) if m["kind"] == "train"]
    assert train == list(range(1, 13))                       # the live plot's points: each step once
    ckpts = runs.list_checkpoints(home, run_id)
    assert [c["name"] for c in ckpts if c["best"]] == [done["best"]["checkpoint"]]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _workers(launcher: int) -> list[int]:
    """The training processes under the launcher (accelerate may start them one level further down)."""
    found, todo = [], [launcher]
    while todo:
        for child in _children(todo.pop()):
            try:
                cmdline = open(f"/proc/{child}/cmdline", "rb").read()
            except OSError:
                continue
            (found if b"refact_lab.finetune.worker" in cmdline and b"accelerate" not in cmdline
             else todo).append(child)
    return found


@pytest.mark.slow
def test_a_killed_process_ends_the_run_as_failed_with_its_log(home, stdlib_project, learnable_model_dir):
    assert _cli(home, stdlib_project, learnable_model_dir, "--processes", "2", "--cpu", "--detach",
                train_steps=500, eval_every=50, checkpoint_every=50) == 0
    run_id = _only_run(home)
    status = _wait_for(lambda: (lambda s: s if s.get("step", 0) >= 2 else None)(runs.read_status(home, run_id)),
                       what="training steps")
    workers = _wait_for(lambda: (lambda w: w if len(w) == 2 else None)(_workers(status["pid"])),
                        what="two worker processes")
    other = [pid for pid in workers if pid != status["worker_pid"]]
    assert len(other) == 1                                   # rank 0 is the one that records the run
    os.kill(other[0], signal.SIGKILL)
    failed = _wait_for(lambda: (lambda s: s if s["state"] not in runs.ACTIVE else None)(
        runs.read_status(home, run_id)), timeout=180, what="the run to end")
    log = runs.log_tail(home, run_id, 300)
    assert failed["state"] == "failed" and failed["error"], log
    assert failed["step"] < 500
    # process 0 saw its peer vanish and says so; had it died itself, a reader finds its owners dead
    assert "another training process of this run ended" in failed["error"] or \
        "ended without finishing" in failed["error"], failed["error"]
    assert len(failed["error"].splitlines()) == 1
    assert "step 0: test loss" in log                        # the log is kept, with what happened before
    _wait_for(lambda: not _workers(status["pid"]) and not runs._owner_alive(runs.read_status(home, run_id)),
              timeout=120, what="every process to end")


@pytest.mark.slow
def test_the_panel_starts_two_cpu_processes(home, stdlib_project, learnable_model_dir):
    from refact_lab.ui.finetune_panel import FinetunePanel

    service = RunService(home)
    panel = FinetunePanel(service, poll_s=0)
    # no GPU on this machine: the device control says CPU, and offers a process count
    assert "CPU" in panel.devices_text.value and panel.gpus.layout.display == "none"
    assert panel.launch_fields["cpu"].input.value is True and panel.launch_fields["cpu"].input.disabled
    panel.model.value = str(learnable_model_dir)
    panel.reload_choices()
    panel.dataset.value = stdlib_project
    for name, value in {**QUICK, "train_steps": 2, "eval_every": 1, "checkpoint_every": 2}.items():
        field = panel.fields[name]
        if field.auto is not None:
            field.auto.value = False
        field.input.value = value
    processes = panel.launch_fields["processes"]
    processes.auto.value = False
    processes.input.value = 2
    panel.update_preview()     # before starting: how it would launch and its memory estimate
    assert "2 processes on CPU (gloo); memory: needs about" in panel.auto_numbers.value
    assert "2 processes x 2 rows per step" in panel.auto_numbers.value
    run_id = panel.start()
    assert run_id, panel.message.value
    launch = service.settings(run_id)["launch"]
    assert launch["processes"] == 2 and launch["cpu"] is True
    done = service.wait(run_id, timeout=300)
    assert done["state"] == "finished" and done["world_size"] == 2, service.log_tail(run_id, 80)
    panel.refresh()
    assert "finished" in panel.progress_text.value and "2 processes on CPU" in panel.progress_text.value


def test_the_panel_lists_the_gpus_with_free_memory_and_builds_the_launch(home, monkeypatch):
    """No GPU here: the service's device list is replaced by two GPUs, to check what the controls make of it."""
    from refact_lab.finetune.memory import GIB, Device
    from refact_lab.ui.finetune_panel import FinetunePanel

    service = RunService(home)
    gpus = [Device("cuda:0", "Test GPU", int(20.5 * GIB), 24 * GIB, 0),
            Device("cuda:1", "Test GPU", 3 * GIB, 24 * GIB, 1)]
    monkeypatch.setattr(service, "devices", lambda: gpus)
    panel = FinetunePanel(service, poll_s=0)
    assert [label for label, _ in panel.gpus.options] == ["GPU 0: Test GPU, 20.5 of 24.0 GiB free",
                                                          "GPU 1: Test GPU, 3.0 of 24.0 GiB free"]
    assert not panel.launch_fields["cpu"].input.disabled and not panel.launch_fields["fsdp"].input.disabled
    launch = panel.launch_settings()
    assert launch.gpus == [0, 1] and launch.processes is None and launch.process_count == 2 and not launch.cpu
    panel.gpus.value = (1,)
    panel.launch_fields["fsdp"].input.value = True
    assert panel.launch_settings().gpus == [1] and panel.launch_settings().fsdp
    panel.launch_fields["fsdp"].input.value = False
    panel.launch_fields["cpu"].input.value = True
    assert panel.launch_settings().gpus is None and panel.launch_settings().cpu
