"""A scan's results are published as one set (a new folder, one switch) and read through `results`; a full
disk midway leaves the previous set current and whole; a dead scan process reads as failed."""

from __future__ import annotations

import errno
import json
import os

import pytest

from refact_lab.cli import main
from refact_lab.config import ScanSettings
from refact_lab.data import pipeline, results
from refact_lab.data.jobs import ScanJob, read_status
from refact_lab.data.pipeline import ScanWriteError, run_scan
from refact_lab.data.sources import SourceStore
from refact_lab.home import proc_start_ticks
from tests.data.conftest import good_py, scan_folder, write_tree

FILES = {f"pkg/m{i}.py": good_py(i) for i in range(6)}


def _consistent(home) -> tuple[results.ScanResults, set[str]]:
    """The published set, checked to agree with itself: its stats count exactly its lists."""
    res = results.read_results(home)
    assert res.stats["accepted"] == len(res.accepted) and res.stats["rejected"] == len(res.rejected)
    assert res.stats["files"] == len(res.accepted) + len(res.rejected)
    return res, {r["path"] for r in res.accepted}


def test_a_scan_publishes_one_set_behind_one_switch(home, tmp_path):
    root = write_tree(tmp_path / "proj", FILES)
    scan_folder(home, root)
    first = results.current_dir(home)
    assert first.parent == home.scan_dir() / results.SETS
    assert os.readlink(home.scan_dir() / results.CURRENT) == f"results/{first.name}"
    assert sorted(p.name for p in first.iterdir()) == sorted(results.SET_FILES)
    # the familiar names still open the current set
    assert (home.scan_dir() / "accepted.jsonl").read_text() == (first / "accepted.jsonl").read_text()
    (root / "pkg/m9.py").write_text(good_py(9))
    scan_folder(home, root)
    second = results.current_dir(home)
    assert second != first and first.is_dir()     # the previous set stays for a reader that just resolved it
    res, paths = _consistent(home)
    assert "pkg/m9.py" in paths and res.folder == second
    scan_folder(home, root)
    assert not first.exists()                      # older ones are removed
    assert len(list((home.scan_dir() / results.SETS).iterdir())) == 2


def test_a_full_disk_midway_leaves_the_previous_set_whole(home, tmp_path, monkeypatch):
    root = write_tree(tmp_path / "proj", FILES)
    scan_folder(home, root)
    before, paths_before = _consistent(home)
    (root / "pkg/new.py").write_text(good_py(50))
    real, calls = results._write_file, []

    def full_after_first(path, text):
        calls.append(path.name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(results, "_write_file", full_after_first)
    with pytest.raises(ScanWriteError, match="No space left on device; the previous results are unchanged"):
        run_scan(home, settings=ScanSettings(lm_filter=False))
    assert calls[0] == "accepted.jsonl"   # the new accepted list was written, then the disk filled up
    after, paths_after = _consistent(home)
    assert after.folder == before.folder and paths_after == paths_before and "pkg/new.py" not in paths_after
    assert after.stats == before.stats
    assert [p.name for p in (home.scan_dir() / results.SETS).iterdir()] == [before.folder.name]  # no debris
    # The CLI says it in one line and exits 1 (a failure while working), no traceback; the status says failed.
    calls.clear()
    code = main(["scan", "--home", str(home.root), "--no-lm-filter"])
    assert code == 1
    assert read_status(home)["state"] == "failed"
    assert results.current_dir(home) == before.folder


def test_cli_full_disk_is_one_line_on_stderr(home, tmp_path, monkeypatch, capsys):
    write_tree(tmp_path / "proj", FILES)
    monkeypatch.setattr(results, "_write_file", lambda path, text: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    code = main(["scan", str(tmp_path / "proj"), "--home", str(home.root), "--no-lm-filter", "--json"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"refact-lab: error: cannot write the scan results in {home.scan_dir()}: No space left on device; the "
        "previous results are unchanged"]
    assert results.current_dir(home) is None and results.read_accepted(home) == []


def test_typed_readers_and_the_dataset_path_go_through_the_current_set(home, tmp_path):
    from refact_lab.finetune.dataset import accepted_path, load_dataset

    assert results.read_results(home) == results.ScanResults() and results.read_stats(home) is None
    root = write_tree(tmp_path / "proj", FILES)
    scan_folder(home, root)
    folder = results.current_dir(home)
    assert accepted_path(home, "default") == folder / "accepted.jsonl" == results.accepted_file(home)
    accepted = results.read_accepted(home)
    assert len(accepted) == 6 and all(r["source_name"] == "proj" for r in accepted)
    assert results.read_rejected(home) == [] and results.read_stats(home)["accepted"] == 6
    assert len(load_dataset(home, "default").train) + len(load_dataset(home, "default").test) == 6


def test_a_state_directory_from_before_sets_is_still_read_then_replaced(home, tmp_path):
    scan = home.scan_dir()
    scan.mkdir(parents=True)
    (scan / "accepted.jsonl").write_text(json.dumps({"source": "s", "path": "old.py", "set": "train"}) + "\n")
    assert results.current_dir(home) == scan and [r["path"] for r in results.read_accepted(home)] == ["old.py"]
    scan_folder(home, write_tree(tmp_path / "proj", FILES))
    assert (scan / "accepted.jsonl").is_symlink() and "old.py" not in {r["path"] for r in results.read_accepted(home)}


def test_a_killed_scan_reads_as_failed_even_if_its_pid_was_reused(home):
    path = pipeline.scan_files(home)["status"]
    path.parent.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    # our own pid is alive, but with another start time it is a different process: the scan's owner died
    path.write_text(json.dumps({"state": "running", "pid": me, "pid_started": proc_start_ticks(me) + 1}))
    status = read_status(home)
    assert status["state"] == "failed" and "ended unexpectedly" in status["error"]
    path.write_text(json.dumps({"state": "queued", "pid": me, "pid_started": proc_start_ticks(me)}))
    assert read_status(home)["state"] == "queued"


def test_the_job_records_pid_and_start_ticks(home, tmp_path):
    SourceStore(home).add_folder(write_tree(tmp_path / "proj", FILES))
    ScanJob(home).run(ScanSettings(lm_filter=False))
    status = json.loads(pipeline.scan_files(home)["status"].read_text())
    assert status["pid"] == os.getpid() and status["pid_started"] == proc_start_ticks(os.getpid())
