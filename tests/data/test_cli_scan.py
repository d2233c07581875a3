"""`refact-lab scan`: the summary, --json, held-out sources, masks, and exit code 2 for a bad source."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from refact_lab.cli import main
from tests.data.conftest import good_py, write_tree

FILES = {**{f"pkg/m{i}.py": good_py(i) for i in range(6)}, "vendor/lib.py": good_py(70), "docs/readme.md": "# x\n",
         "tests/test_m.py": good_py(71)}


def test_json_summary(home, tmp_path, capsys):
    proj = write_tree(tmp_path / "proj", FILES)
    held = write_tree(tmp_path / "held", {"check.py": good_py(90)})
    code = main(["scan", str(proj), "--home", str(home.root), "--test", str(held), "--exclude", "tests/",
                 "--no-lm-filter", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["files"] == 10 and data["accepted"] == 7
    assert data["reasons"] == {"excluded_by_mask": 1, "vendored": 1, "type_off": 1}
    assert data["train"]["files"] == 6 and data["test"]["files"] == 1
    assert [s["test"] for s in data["sources"]] == [False, True]
    accepted = [json.loads(x) for x in open(data["logs"]["accepted"])]
    assert {r["path"] for r in accepted if r["set"] == "test"} == {"check.py"}
    # no progress bar with --json: stderr holds only the warning that one small test file is noisy
    assert [line.split(":")[:2] for line in err.splitlines()] == [["refact-lab", " warning"]]


def test_text_summary_and_rescan_reuses_sources(home, tmp_path, capsys):
    proj = write_tree(tmp_path / "proj", FILES)
    assert main(["scan", str(proj), "--home", str(home.root), "--no-lm-filter"]) == 0
    assert main(["scan", str(proj), "--home", str(home.root), "--no-lm-filter"]) == 0
    out, err = capsys.readouterr()
    assert out.count("Scanned 1 source(s), 9 files") == 2   # the same folder is not added twice
    assert "vendored" in out and "type_off" in out and "train 6 files" in out and "test 1 files" in out
    assert "file types on: Python (also found: Markdown 1" in out
    assert "Reading files" in err  # the tqdm bar on stderr


@pytest.mark.parametrize("source,message", [
    ("{tmp}/does-not-exist", "no such file or folder"),
    ("https://127.0.0.1:9/team/repo.git", "cannot clone https://127.0.0.1:9/team/repo.git"),
    ("{tmp}/broken.tar.gz", "broken.tar.gz: "),
    ("ext::sh -c id", "transport 'ext::' is not allowed"),
])
def test_bad_source_is_one_line_and_exit_code_2(home, tmp_path, capsys, source, message):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not gzip at all")
    code = main(["scan", source.format(tmp=tmp_path), "--home", str(home.root), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("refact-lab: error: ") and message in err and err.count("\n") == 1
    assert list(home.sources_dir().glob("*")) == [] if home.sources_dir().exists() else True


def test_too_few_files_exits_1_with_the_number_needed(home, tmp_path, capsys):
    proj = write_tree(tmp_path / "proj", {"only.py": good_py(1)})
    code = main(["scan", str(proj), "--home", str(home.root), "--no-lm-filter"])
    _, err = capsys.readouterr()
    assert code == 1 and "1 file accepted; at least 2 are needed" in err


def test_bad_setting_is_exit_2(home, tmp_path, capsys):
    proj = write_tree(tmp_path / "proj", FILES)
    assert main(["scan", str(proj), "--home", str(home.root), "--set", "digit_share=2"]) == 2
    assert "digit_share" in capsys.readouterr().err


def test_the_installed_command_with_the_loss_filter(home, tmp_path, tiny_model_dir):
    proj = write_tree(tmp_path / "proj", FILES)
    run = subprocess.run([sys.executable, "-m", "refact_lab.cli", "scan", str(proj), "--home", str(home.root),
                          "--model", str(tiny_model_dir), "--set", "loss_threshold=50", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["loss"]["computed"] == 7 and data["accepted"] == 7
    accepted = [json.loads(x) for x in open(data["logs"]["accepted"])]
    assert all(isinstance(r["loss"], float) for r in accepted)


def test_every_file_over_the_loss_threshold_says_what_to_do(home, tmp_path, capsys, tiny_model_dir):
    proj = write_tree(tmp_path / "proj", FILES)
    code = main(["scan", str(proj), "--home", str(home.root), "--model", str(tiny_model_dir),
                 "--set", "loss_threshold=0.1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "loss_too_high          7" in out
    assert "above loss_threshold 0.1" in err and "--no-lm-filter" in err
    assert "0 files accepted; at least 2 are needed" in err
