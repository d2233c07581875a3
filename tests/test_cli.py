"""The CLI skeleton: help lists every subcommand; bad input exits 2 with one clear line."""

import subprocess
import sys


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
