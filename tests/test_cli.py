"""The CLI skeleton: help lists every subcommand; bad input exits 2 with one clear line."""

import subprocess
import sys

import pytest

from refact_lab.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "refact_lab.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("serve", "scan", "finetune", "runs", "complete"):
        assert cmd in out.stdout


def test_serve_refuses_no_auth_on_public_host():
    out = run_cli("serve", "--host", "0.0.0.0", "--no-auth")
    assert out.returncode == 2
    assert "--no-auth is refused" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_unknown_model(tmp_path):
    out = run_cli("serve", "--home", str(tmp_path), "--model", "no-such-model")
    assert out.returncode == 2
    assert "unknown model 'no-such-model'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--set", "learning_rate=nan", "--detach"], "learning_rate: expected a finite number, got nan"),
    (["finetune", "--set", "train_steps=", "--detach"],
     "train_steps: the value is empty; write train_steps=auto for the automatic value"),
    (["scan", "--no-lm-filter", "--set", "digit_share=nan"], "digit_share: expected a finite number, got nan"),
    (["scan", "--no-lm-filter", "--set", "test_share=nan"], "test_share: expected a finite number, got nan"),
])
def test_a_set_value_that_is_nan_or_empty_is_refused_before_any_work(tmp_path, capsys, argv, message):
    home = tmp_path / "home"
    rc = main([*argv, "--home", str(home)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"refact-lab: error: {message}\n"
    assert not (home / "runs").is_dir() or not any((home / "runs").iterdir())


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    # `refact-lab runs --json | head -1`: the reader is gone before the output is written
    proc = subprocess.Popen([sys.executable, "-m", "refact_lab.cli", "runs", "--json", "--home", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err
