"""`refact-lab finetune` (foreground with a progress bar, or --detach) and `refact-lab runs`."""

import json

import pytest

from refact_lab.cli import main
from refact_lab.finetune.runs import RunService

QUICK = ["seq_len=128", "batch_size=4", "train_steps=6", "eval_every=3", "checkpoint_every=3", "max_test_rows=8",
         "lora_r=8", "learning_rate=0.01"]


def _sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.mark.parametrize("pair, message", [
    ("lora_r=0", "lora_r: 0 is below the minimum 1"),
    ("learning_rate=fast", "learning_rate: cannot read 'fast' as float"),
    ("rank=4", "unknown setting 'rank'"),
    ("lora_r", "expected key=value, got 'lora_r'"),
])
def test_invalid_set_is_one_clear_line_and_exit_2(home, stdlib_project, capsys, pair, message):
    rc = main(["finetune", "--home", str(home.root), "--project", stdlib_project, "--set", pair])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("refact-lab: error: ") and message in err[0]


def test_unknown_model_or_project_exit_2(home, stdlib_project, capsys):
    assert main(["finetune", "--home", str(home.root), "--project", stdlib_project, "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["finetune", "--home", str(home.root), "--project", "missing"]) == 2
    assert "no scanned dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_in_the_foreground_then_runs_lists_it(home, stdlib_project, learnable_model_dir, capsys):
    rc = main(["finetune", "--home", str(home.root), "--project", stdlib_project, "--model",
               str(learnable_model_dir), *_sets(QUICK)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "finished at step 6/6, best checkpoint step-00000" in out
    assert "6/6" in err and "step 0: test loss" in err        # the progress bar and the log lines
    runs = RunService(home).runs()
    assert len(runs) == 1 and runs[0]["state"] == "finished" and runs[0]["pid"]
    log = RunService(home).log_tail(runs[0]["run_id"], 100)
    assert "step 0: test loss" in log                          # the same log a detached run writes

    assert main(["runs", "--home", str(home.root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["state"], r["step"]) for r in listed] == [(runs[0]["run_id"], "finished", 6)]
    assert listed[0]["best"]["checkpoint"].startswith("step-")
    assert main(["runs", "--home", str(home.root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RUN", "STATE", "STEP", "BEST", "CHECKPOINT", "MODEL", "PROJECT"]
    assert runs[0]["run_id"] in table[1] and "finished" in table[1] and listed[0]["best"]["checkpoint"] in table[1]


@pytest.mark.slow
def test_detach_returns_the_run_id_and_the_run_finishes_on_its_own(home, stdlib_project, learnable_model_dir,
                                                                   capsys):
    rc = main(["finetune", "--home", str(home.root), "--project", stdlib_project, "--model",
               str(learnable_model_dir), "--detach", *_sets(QUICK)])
    out = capsys.readouterr().out.strip()
    assert rc == 0 and len(out.splitlines()) == 1
    run_id = out
    service = RunService(home)
    assert service.status(run_id)["state"] in ("queued", "running")
    status = service.wait(run_id, timeout=180)
    assert status["state"] == "finished", service.log_tail(run_id)


def test_runs_on_an_empty_home(home, capsys):
    assert main(["runs", "--home", str(home.root)]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert main(["runs", "--home", str(home.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
