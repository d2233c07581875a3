"""`refact-lab finetune` (foreground with a progress bar, or --detach) and `refact-lab runs`."""

import json

import pytest

from refact_lab.cli import main
from refact_lab.config import FinetuneSettings, with_overrides
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


def _scan_tiny_folder(home, tmp_path, capsys) -> None:
    """A newcomer's first steps: a few real source files, scanned with the default settings."""
    import shutil

    from tests.finetune.conftest import STDLIB, TEST_FILES, TRAIN_FILES

    code = tmp_path / "code"
    for name in TRAIN_FILES[:6] + TEST_FILES[:2]:
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STDLIB / name, code / name)
    assert main(["scan", str(code), "--home", str(home.root)]) == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.slow
def test_finetune_with_the_defaults_on_the_default_model_after_a_scan(home, tmp_path, capsys):
    """The README's example: no --model, no seq_len: the embedded default model (512 tokens of context) must
    get a sequence length that fits it, and the run must train."""
    from refact_lab.models.registry import resolve

    _scan_tiny_folder(home, tmp_path, capsys)
    rc = main(["finetune", "--home", str(home.root), "--set", "train_steps=2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "finished at step 2/2" in out
    [run] = RunService(home).runs()
    assert run["state"] == "finished" and run["model"] == resolve("default").name
    n_ctx = resolve("default").n_ctx
    assert run["schedule"]["seq_len"] == min(1024, n_ctx)
    assert f"seq_len auto = the smaller of 1024 and the model's context ({n_ctx})" in \
        RunService(home).log_tail(run["run_id"], 100)


def test_a_seq_len_longer_than_the_model_is_refused_before_a_run_exists(home, stdlib_project, capsys):
    rc = main(["finetune", "--home", str(home.root), "--project", stdlib_project, "--set", "seq_len=1024"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["refact-lab: error: seq_len: 1024 is longer than the model's context (512 tokens); use at "
                   "most 512 or auto"]
    assert RunService(home).runs() == []


@pytest.mark.slow
def test_resume_continues_a_stopped_run_in_the_foreground_or_detached(home, stdlib_project, learnable_model_dir,
                                                                      capsys):
    from refact_lab.finetune import runs

    settings = with_overrides(FinetuneSettings(), QUICK)
    run_id = runs.create_run(home, stdlib_project, str(learnable_model_dir), settings)
    path = home.run_dir(run_id)
    runs.request_stop(path)                                 # stops after its first step, as a user would
    runs.execute_run(path, log=lambda m: runs.append_log(path, m))
    assert runs.read_status(home, run_id)["state"] == "stopped"

    rc = main(["resume", run_id, "--home", str(home.root)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"{run_id}: finished at step 6/6" in out and "resumed from step-000001" in err
    # a finished run has nothing to resume: one line, exit 2; an unknown run likewise
    assert main(["resume", run_id, "--home", str(home.root)]) == 2
    assert capsys.readouterr().err.strip() == (f"refact-lab: error: run {run_id} is finished: only a stopped or "
                                               "failed run can be resumed")
    assert main(["resume", "nope", "--home", str(home.root)]) == 2
    assert "no run 'nope'" in capsys.readouterr().err

    runs.update_status(path, state="failed", error="for the test")
    assert main(["resume", run_id, "--home", str(home.root), "--detach"]) == 0
    assert capsys.readouterr().out.strip() == run_id
    assert RunService(home).wait(run_id, timeout=120)["state"] == "finished"
