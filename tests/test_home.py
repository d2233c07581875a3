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


@pytest.mark.parametrize("damage, words", [
    (b"\xff\xfe\x00garbage", "is not valid JSON: it is not UTF-8 text"),
    (None, "is a folder, not a JSON file"),   # a folder where the file belongs
])
def test_read_json_names_a_file_it_cannot_decode(tmp_path, damage, words):
    path = tmp_path / "x.json"
    if damage is None:
        path.mkdir()
    else:
        path.write_bytes(damage)
    with pytest.raises(ValueError) as err:
        read_json(path)
    assert str(err.value) == f"{path} {words}"


@pytest.mark.parametrize("text, found", [("[1, 2]", "a list"), ('"str"', "a string"), ("null", "null"),
                                         ("3", "a number")])
def test_settings_that_are_not_an_object_are_refused_naming_the_file(tmp_path, text, found):
    home = Home.resolve(tmp_path / "s").ensure()
    home.settings_file.write_text(text)
    message = f"{home.settings_file} is damaged: expected a JSON object, found {found}"
    with pytest.raises(ValueError) as err:
        home.load_settings()
    assert str(err.value) == message
    with pytest.raises(ValueError, match="is damaged"):
        home.update_settings(model="default")   # never overwritten as if it were empty
    assert home.settings_file.read_text() == text


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


# --- a state directory that cannot be one: clear error, exit 2, nothing created --------------------------

# Every subcommand that takes --home, with arguments that would otherwise get past argument parsing.
SUBCOMMANDS = [["scan", "--no-lm-filter"], ["finetune"], ["runs"], ["complete", "def f("], ["resume", "run-1"]]


def _bad_homes(tmp_path):
    a_file = tmp_path / "state.txt"
    a_file.write_text("not a folder\n")
    return {"a file": (str(a_file), "is not a folder"), "/dev/null": ("/dev/null", "is not a folder"),
            "under a file": (str(a_file / "sub"), "is not a folder"), "empty": ("", "is empty"),
            "blank": ("  ", "is empty")}


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=lambda a: a[0])
@pytest.mark.parametrize("which", ["a file", "/dev/null", "under a file", "empty", "blank"])
def test_cli_refuses_a_home_that_is_not_a_folder(tmp_path, monkeypatch, capsys, args, which):
    from refact_lab.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "user"))          # where a silent fallback would write
    monkeypatch.setenv("REFACT_LAB_HOME", str(tmp_path / "env-home"))
    value, message = _bad_homes(tmp_path)[which]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([*args[:1], "--home", value, *args[1:]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("refact-lab: error: the state directory") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # nothing created anywhere


def test_serve_refuses_a_bad_home_before_starting(tmp_path):
    import subprocess
    import sys

    (tmp_path / "f").write_text("x")
    done = subprocess.run([sys.executable, "-m", "refact_lab.cli", "serve", "--home", str(tmp_path / "f"),
                           "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"refact-lab: error: the state directory {tmp_path / 'f'} is not a folder (it is " \
                                  "a file or a device); give a folder path to --home"


def test_home_resolve_and_ensure_validate(tmp_path):
    from refact_lab.home import HomeError

    (tmp_path / "f").write_text("x")
    for bad in ("", "  ", tmp_path / "f", "/dev/null", tmp_path / "f" / "deeper"):
        with pytest.raises(HomeError):
            Home.resolve(bad)
    with pytest.raises(HomeError, match="is not a folder"):
        Home(tmp_path / "f").ensure()
    assert Home.resolve(tmp_path / "new" / "deep").ensure().settings_file.is_file()


def test_sources_inside_the_state_directory_are_refused(tmp_path, capsys):
    import zipfile

    from refact_lab.cli import main

    home = Home.resolve(tmp_path / "state").ensure()
    home.update_settings(openai_key="sk-secret")
    archive = home.root / "code.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.py", "x = 1\n")
    (home.root / "projects" / "mine").mkdir()
    for spec in (home.settings_file, archive, home.root / "projects" / "mine", home.root, tmp_path):
        code = main(["scan", str(spec), "--home", str(home.root), "--no-lm-filter"])
        err = capsys.readouterr().err
        assert code == 2, (spec, err)
        assert "state directory" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not home.sources_dir().exists() or not any(home.sources_dir().iterdir())


def test_scans_runs_and_updates_share_one_job_status(home):
    """One meaning of a job status: the same owner fields and the same verdict on a dead owner."""
    import subprocess
    import sys

    from refact_lab import job_status

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = job_status.owner_fields(proc.pid)
    assert job_status.orphaned({"state": "running", **owner}) is False
    proc.kill()
    proc.wait()
    for state in job_status.ACTIVE:
        assert job_status.orphaned({"state": state, **owner})
    assert not job_status.orphaned({"state": "finished", **owner})          # a finished job is not dead
    assert not job_status.orphaned({"state": "running"})                    # no owner named: cannot tell
    # a run is alive while either its launcher or its worker is
    me = job_status.owner_fields(keys=job_status.RUN_OWNERS[1])
    assert not job_status.orphaned({"state": "running", **owner, **me}, job_status.RUN_OWNERS)
    folder = home.root / "job"
    folder.mkdir()
    assert not job_status.stop_requested(folder)
    job_status.request_stop(folder)
    assert job_status.stop_requested(folder)
    job_status.clear_stop(folder)
    assert not job_status.stop_requested(folder)


def test_a_line_cut_off_by_a_crash_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "history.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "no')  # the process died mid-line
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
