"""The state directory: layout, atomic JSON writes, safe names, settings with credentials kept private."""

import json
import os
import stat

import pytest

from refact_lab.home import Home, append_jsonl, atomic_write_json, check_name, read_json, read_jsonl


def test_ensure_creates_layout(tmp_path):
    home = Home.resolve(tmp_path / "state").ensure()
    assert home.projects_dir.is_dir() and home.runs_dir.is_dir()
    assert json.loads(home.settings_file.read_text()) == {}
    assert stat.S_IMODE(os.stat(home.settings_file).st_mode) == 0o600
    assert home.scan_dir("demo") == home.root / "projects" / "demo" / "scan"


def test_env_var_chooses_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFACT_LAB_HOME", str(tmp_path / "from-env"))
    assert Home.resolve().root == (tmp_path / "from-env").resolve()


def test_atomic_write_leaves_no_temp_files_and_survives_failure(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"step": 1})
    class Boom:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        atomic_write_json(target, {"bad": Boom()})  # fails mid-way: must not touch the old file
    assert read_json(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_read_json_names_corrupt_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="x.json"):
        read_json(bad)
    assert read_json(tmp_path / "missing.json", default={"a": 1}) == {"a": 1}


def test_jsonl_skips_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2})
    with open(path, "a") as f:
        f.write('{"step": 3')  # a writer caught mid-line
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid"):
        check_name(name)


def test_update_settings_merges_and_removes(tmp_path):
    home = Home.resolve(tmp_path / "s").ensure()
    home.update_settings(model="default", openai_key="sk-x")
    assert home.update_settings(openai_key=None) == {"model": "default"}
    assert stat.S_IMODE(os.stat(home.settings_file).st_mode) == 0o600


def test_pid_alive_sees_a_dead_child_and_a_recycled_pid():
    import subprocess
    import sys

    from refact_lab.home import pid_alive, proc_start_ticks

    assert pid_alive(os.getpid(), proc_start_ticks(os.getpid()))
    assert not pid_alive(os.getpid(), 1)  # same pid, another start time: a recycled pid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
