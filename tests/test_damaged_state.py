"""Hand-damaged state files: a command that needs one fails with one line naming the file and what is wrong; one
broken run folder is listed as broken with its reason while the other runs keep working."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from refact_lab.cli import main
from refact_lab.finetune import checkpoints, runs
from refact_lab.home import atomic_write_json

STATUS_DAMAGE = {
    "missing": (None, "status.json is missing"),
    "a list": ("[]", "status.json is damaged: expected a JSON object, found []"),
    "not json": ("{bad", "status.json is not valid JSON"),
    "bad best": ('{"state": "finished", "best": "bad"}', "status.json is damaged: best: expected an object"),
    "bad state": ('{"state": "exploded"}', "status.json is damaged: state: 'exploded' is not one of"),
    "bad time": ('{"state": "finished", "created_at": "yesterday"}', "created_at: expected a number"),
}


def _run(home, run_id: str, created_at: float) -> None:
    """A finished run folder with one complete checkpoint (its adapter files are readable placeholders: a PEFT
    export checks and copies them, nothing loads them)."""
    import torch
    from safetensors.torch import save_file

    path = home.run_dir(run_id)
    ck = path / "checkpoints" / "step-000010"
    atomic_write_json(ck / "metrics.json", {"step": 10, "test_loss": 1.5})
    atomic_write_json(ck / checkpoints.ADAPTER_CONFIG, {})
    save_file({"placeholder": torch.zeros(1)}, str(ck / checkpoints.ADAPTER_WEIGHTS))
    atomic_write_json(path / "settings.json", {"run_id": run_id, "model": "default", "project": "default"})
    atomic_write_json(path / "status.json", {
        "run_id": run_id, "state": "finished", "step": 10, "total": 10, "created_at": created_at,
        "model": "default", "project": "default", "best": {"checkpoint": "step-000010", "step": 10, "test_loss": 1.5}})
    (path / "log.txt").write_text("")


@pytest.fixture(params=list(STATUS_DAMAGE))
def one_broken_run(request, home):
    """Runs "good" and (newer) "bad", whose status.json is damaged one way; yields the reason it should give."""
    _run(home, "good", time.time() - 60)
    _run(home, "bad", time.time())
    text, reason = STATUS_DAMAGE[request.param]
    status = home.run_dir("bad") / "status.json"
    status.unlink()
    if text is not None:
        status.write_text(text)
    return reason


def _cli(capsys, home, *argv) -> tuple[int, str, str]:
    rc = main([*argv, "--home", str(home.root)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2 and err.startswith("refact-lab: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def test_a_broken_run_is_listed_with_its_reason_and_the_others_still_list(home, one_broken_run, capsys):
    listed = {s["run_id"]: s for s in runs.list_runs(home)}
    assert listed["good"]["state"] == "finished"
    assert listed["bad"]["state"] == runs.BROKEN and one_broken_run in listed["bad"]["error"]
    assert str(home.run_dir("bad")) in listed["bad"]["error"]   # the file is named with its folder
    assert runs.RunService(home).status("bad")["state"] == runs.BROKEN   # a panel shows it rather than crash

    rc, out, err = _cli(capsys, home, "runs")
    assert rc == 0 and err == ""
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["good"].split()[1] == "finished" and "step-000010 (1.5000)" in lines["good"]
    assert lines["bad"].split()[1] == "broken" and one_broken_run in lines["bad"]
    rc, out, _ = _cli(capsys, home, "runs", "--json")
    assert rc == 0 and {s["run_id"]: s["state"] for s in json.loads(out)} == {"good": "finished", "bad": "broken"}


def test_commands_that_need_the_broken_run_name_its_file(home, one_broken_run, capsys, tmp_path):
    for argv in (["export", "--run", "bad", "--out", str(tmp_path / "x")], ["resume", "bad"],
                 ["deploy", "--run", "bad"]):
        rc, _, err = _cli(capsys, home, *argv)
        _one_line_error(rc, err, one_broken_run)
    assert not (tmp_path / "x").exists()


def test_the_other_runs_keep_working_beside_a_broken_one(home, one_broken_run, capsys, tmp_path):
    rc, out, err = _cli(capsys, home, "deploy")
    assert rc == 0 and "lora:       off" in out, err
    # "best" of the newest run passes over the broken (newer) one
    rc, out, err = _cli(capsys, home, "deploy", "--checkpoint", "best")
    assert rc == 0 and "= good/step-000010" in out, err
    rc, out, err = _cli(capsys, home, "deploy", "--run", "good")
    assert rc == 0 and "= good/step-000010" in out, err
    rc, out, err = _cli(capsys, home, "export", "--run", "good", "--out", str(tmp_path / "x"))
    assert rc == 0 and (tmp_path / "x" / checkpoints.ADAPTER_CONFIG).is_file(), err


def test_a_run_with_damaged_settings_is_refused_naming_the_file(home, capsys, tmp_path):
    _run(home, "good", time.time())
    settings = home.run_dir("good") / "settings.json"
    settings.write_text("[1]")
    for argv in (["export", "--run", "good", "--out", str(tmp_path / "x")], ["resume", "good"]):
        rc, _, err = _cli(capsys, home, *argv)
        _one_line_error(rc, err, f"{settings} is damaged: expected a JSON object, found a list")


SETTINGS_DAMAGE = {
    "a list": ("[1,2]", "settings.json is damaged: expected a JSON object, found a list"),
    "a string": ('"str"', "settings.json is damaged: expected a JSON object, found a string"),
    "not json": ("{bad", "settings.json is not valid JSON"),
    "binary": (b"\xff\xfe\x00\x01", "settings.json is not valid JSON: it is not UTF-8 text"),
    "a folder": (None, "settings.json is a folder, not a JSON file"),
    "wrong types": ('{"context": 5, "context_tokens": "lots"}', "settings.json: invalid context project 5"),
}


@pytest.mark.parametrize("damage", list(SETTINGS_DAMAGE))
@pytest.mark.parametrize("argv", [["deploy"], ["host", "list"], ["finetune"], ["complete", "x"], ["eval"],
                                  ["scan"]], ids=lambda argv: argv[0])
def test_every_command_that_reads_settings_refuses_a_damaged_file(home, capsys, damage, argv):
    content, words = SETTINGS_DAMAGE[damage]
    home.settings_file.unlink()
    if content is None:
        home.settings_file.mkdir()
    elif isinstance(content, bytes):
        home.settings_file.write_bytes(content)
    else:
        home.settings_file.write_text(content)
    rc, _, err = _cli(capsys, home, *argv)
    _one_line_error(rc, err, words)


def test_an_unknown_model_in_settings_is_one_line_without_a_traceback(home):
    # in a process of its own: the engine's log would print its traceback on the real stderr
    home.update_settings(model="nosuchmodel")
    out = subprocess.run([sys.executable, "-m", "refact_lab.cli", "complete", "x", "--home", str(home.root)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"refact-lab: error: {home.settings_file}: model: unknown model 'nosuchmodel'")


@pytest.mark.parametrize("where, words", [
    ("file", "{out} is a file, not a folder: choose a new folder"),
    ("file/sub", "{out} cannot be created: {file} is a file, not a folder"),
])
def test_export_says_when_its_folder_is_a_file(home, capsys, tmp_path, where, words):
    _run(home, "good", time.time())
    (tmp_path / "file").write_text("mine")
    out = tmp_path / where
    rc, _, err = _cli(capsys, home, "export", "--run", "good", "--out", str(out))
    _one_line_error(rc, err, words.format(out=out, file=tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_export_into_a_place_that_takes_no_folders_names_it(home, capsys):
    _run(home, "good", time.time())
    rc, _, err = _cli(capsys, home, "export", "--run", "good", "--out", "/proc/refact-lab-export")
    # root: /proc takes no new folders (exit 2); anyone else: permission denied (exit 1); the path named either way
    assert rc in (1, 2) and err.count("\n") == 1 and "/proc/refact-lab-export" in err, err


def test_a_broken_runs_checkpoints_are_still_listed(home, one_broken_run):
    # the run list says why "bad" is broken; the fine-tune panel then reads its checkpoints (it raised)
    assert [c["name"] for c in runs.list_checkpoints(home, "bad")] == ["step-000010"]


@pytest.mark.parametrize("text", ["{bad", "[]", '{"state": 3}'])
def test_a_damaged_scan_status_reads_as_failed_naming_the_file(home, capsys, text):
    from refact_lab.data.jobs import read_status
    from refact_lab.data.pipeline import scan_files

    path = scan_files(home, "default")["status"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    status = read_status(home, "default")
    assert status["state"] == "failed" and str(path) in status["error"], status


@pytest.mark.parametrize("name, text, words", [
    ("overrides.json", "[1, 2]", "expected a JSON object"),
    ("overrides.json", '{"include": "a.py"}', "include: expected a list"),
])
def test_damaged_scan_overrides_are_refused_naming_the_file(home, name, text, words):
    from refact_lab.data.pipeline import load_overrides, scan_files

    path = scan_files(home, "default")["overrides"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as e:   # an AttributeError, or one override per letter, before
        load_overrides(home, "default")
    assert str(path) in str(e.value)


def test_published_scan_results_of_the_wrong_shape_read_as_damaged(home, tmp_path):
    from refact_lab.data import results
    from tests.data.conftest import scan_folder

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def f():\n    return 1\n")
    scan_folder(home, tmp_path / "src")
    folder = results.current_dir(home, "default")
    with open(folder / results.ACCEPTED, "a") as f:
        f.write("[1, 2]\n")   # valid JSON, not a record: skipped like a line that is not JSON
    assert [r["path"] for r in results.read_results(home, "default").accepted] == ["a.py"]
    (folder / results.STATS).write_text("[]")
    with pytest.raises(ValueError, match="stats.json is damaged"):
        results.read_results(home, "default")
