"""The scan runner and its job: overrides, held-out files, incremental re-scan, status on disk, stopping."""

from __future__ import annotations

import json
import threading

import pytest

from refact_lab.config import ScanSettings
from refact_lab.data import pipeline
from refact_lab.data.jobs import ScanJob, read_status
from refact_lab.data.pipeline import ScanCancelled, ScanError, run_scan
from refact_lab.data.service import ProjectService
from refact_lab.data.sources import SourceStore
from tests.data.conftest import good_py, scan_folder

BASE = {f"pkg/mod_{i}.py": good_py(i) for i in range(6)}


def test_no_sources_is_a_clear_error(home):
    with pytest.raises(ScanError, match="no sources to scan"):
        run_scan(home, settings=ScanSettings(lm_filter=False))


def test_force_include_and_force_exclude_then_rerun(home, tree):
    root = tree({**BASE, "vendor/lib.py": good_py(50), "pkg/blob.py": b"\x00\x01binary"})
    accepted, rejected, _ = scan_folder(home, root)
    src = SourceStore(home).list()[0].id
    assert rejected["vendor/lib.py"]["reason"] == "vendored"
    service = ProjectService(home)
    service.force_include(f"{src}/vendor/lib.py")
    service.force_exclude(f"{src}/pkg/mod_0.py")
    service.force_include(f"{src}/pkg/blob.py")
    accepted, rejected, stats = scan_folder(home, root)
    assert accepted["vendor/lib.py"]["forced"] is True
    assert accepted["vendor/lib.py"]["overridden"] == {"reason": "vendored", "detail": "inside vendor/"}
    assert len(accepted["vendor/lib.py"]["sha256"]) == 64
    assert rejected["pkg/mod_0.py"]["reason"] == "forced_exclude"
    assert rejected["pkg/blob.py"]["reason"] == "not_text"          # binary cannot be forced in
    assert "force-include ignored" in rejected["pkg/blob.py"]["detail"]
    assert stats["reasons"]["forced_exclude"] == 1
    # Including a file clears its exclusion and the reverse; clearing returns it to the rules.
    service.force_include(f"{src}/pkg/mod_0.py")
    assert f"{src}/pkg/mod_0.py" not in service.overrides()["exclude"]
    service.clear_override(f"{src}/vendor/lib.py")
    accepted, rejected, _ = scan_folder(home, root)
    assert "pkg/mod_0.py" in accepted and rejected["vendor/lib.py"]["reason"] == "vendored"


def test_test_sources_and_test_files_are_held_out(home, tree, tmp_path):
    from tests.data.conftest import write_tree

    root = tree(BASE)
    held = write_tree(tmp_path / "held", {"t/check_a.py": good_py(80), "t/check_b.py": good_py(81),
                                          "t/dup.py": good_py(1)})
    store = SourceStore(home)
    store.add_folder(root)
    test_src = store.add_folder(held, test=True)
    accepted, rejected, stats = scan_folder(home, root)
    assert {p for p, r in accepted.items() if r["set"] == "test"} == {"t/check_a.py", "t/check_b.py", "t/dup.py"}
    # The training copy of a held-out file is the one rejected, so the test set stays as the user made it.
    assert rejected["pkg/mod_1.py"]["reason"] == "duplicate"
    assert rejected["pkg/mod_1.py"]["detail"] == f"same content as t/dup.py in {test_src.name}"
    assert stats["test"]["files"] == 3 and stats["train"]["files"] == 5
    # A single file marked test instead.
    store.set_test(test_src.id, False)
    src = store.find(str(root)).id
    ProjectService(home).mark_file_test(f"{src}/pkg/mod_3.py")
    accepted, _, stats = scan_folder(home, root)
    assert [p for p, r in accepted.items() if r["set"] == "test"] == ["pkg/mod_3.py"]


def test_automatic_split_and_split_error_in_stats(home, tree):
    root = tree(BASE)
    accepted, _, stats = scan_folder(home, root)
    assert stats["test"]["files"] == 1 and stats["train"]["files"] == 5 and stats["split_error"] is None
    accepted2, _, _ = scan_folder(home, root)
    assert {p for p, r in accepted.items() if r["set"] == "test"} == {p for p, r in accepted2.items()
                                                                      if r["set"] == "test"}
    _, _, stats = scan_folder(home, root, exclude=["pkg/mod_[1-5].py"])
    assert stats["split_error"].startswith("1 file accepted; at least 2 are needed")


def test_changed_file_is_read_again_others_come_from_cache(home, tree):
    root = tree(BASE)
    _, _, stats = scan_folder(home, root)
    assert stats["files_read"] == 6
    (root / "pkg/mod_2.py").write_text(good_py(200))
    accepted, _, stats = scan_folder(home, root)
    assert stats["files_read"] == 1 and stats["files_cached"] == 5
    assert accepted["pkg/mod_2.py"]["sha256"] == __import__("hashlib").sha256(good_py(200).encode()).hexdigest()


def test_job_runs_in_background_with_status_on_disk(home, tree):
    tree(BASE)
    SourceStore(home).add_folder(tree(BASE))
    seen = []
    job = ScanJob(home, on_finish=seen.append)
    job.start(ScanSettings(lm_filter=False))
    status = job.wait(60)
    assert status["state"] == "finished" and status["summary"]["accepted"] == 6
    assert status["done"] == status["total"] == 6
    assert seen and seen[0]["state"] == "finished"
    on_disk = json.loads(pipeline.scan_files(home)["status"].read_text())
    assert on_disk["state"] == "finished" and on_disk["pid"]


def test_stopping_writes_nothing_and_reports_stopped(home, tree):
    root = tree(BASE)
    scan_folder(home, root)
    before = pipeline.scan_files(home)["accepted"].read_text()
    (root / "pkg/extra.py").write_text(good_py(300))
    stop = threading.Event()
    stop.set()  # asked before the first step boundary: the scan stops there
    with pytest.raises(ScanCancelled):
        run_scan(home, settings=ScanSettings(lm_filter=False), should_stop=stop.is_set)
    assert pipeline.scan_files(home)["accepted"].read_text() == before
    # Through the job, stopped midway: the status says so, the results are unchanged, the stop file is gone.
    job = ScanJob(home)

    def progress(stage, done, total):
        if stage == "reading":
            job.stop()

    with pytest.raises(ScanCancelled):
        job.run(ScanSettings(lm_filter=False), progress=progress)
    assert read_status(home)["state"] == "stopped"
    assert pipeline.scan_files(home)["accepted"].read_text() == before
    assert not pipeline.scan_files(home)["stop"].exists()


def test_ctrl_c_during_a_scan_is_a_stop(home, tree):
    """Ctrl-C in a terminal stops a scan as the Stop button does: the status says stopped (not failed), the
    results are unchanged, and the interrupt still reaches the command (exit 130)."""
    root = tree(BASE)
    scan_folder(home, root)
    before = pipeline.scan_files(home)["accepted"].read_text()
    (root / "pkg/extra.py").write_text(good_py(301))
    job = ScanJob(home)

    def progress(stage, done, total):
        if stage == "reading":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.run(ScanSettings(lm_filter=False), progress=progress)
    assert read_status(home)["state"] == "stopped"
    assert pipeline.scan_files(home)["accepted"].read_text() == before


def test_failed_job_reports_the_error(home, tree):
    SourceStore(home).add_folder(tree(BASE))
    job = ScanJob(home).start(ScanSettings(lm_filter=False, file_types=["NoSuchLanguage"]))
    status = job.wait(60)
    assert status["state"] == "failed" and "unknown file type 'NoSuchLanguage'" in status["error"]


def test_status_of_a_dead_process_reads_as_failed(home):
    path = pipeline.scan_files(home)["status"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"state": "running", "pid": 2**22 + 12345}))
    assert read_status(home)["state"] == "failed"


def test_a_second_concurrent_scan_is_refused(home, tree):
    import fcntl

    SourceStore(home).add_folder(tree(BASE))
    lock = pipeline.scan_files(home)["lock"]
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ScanError, match="another scan of this project is running"):
            run_scan(home, settings=ScanSettings(lm_filter=False))


def test_vanished_folder_source_is_a_clear_error(home, tmp_path):
    from tests.data.conftest import write_tree

    root = write_tree(tmp_path / "gone", BASE)
    SourceStore(home).add_folder(root)
    import shutil

    shutil.rmtree(root)
    with pytest.raises(ScanError, match="does not exist any more"):
        run_scan(home, settings=ScanSettings(lm_filter=False))


def test_file_names_that_are_not_utf8_do_not_break_the_logs(home, tmp_path):
    import os

    from tests.data.conftest import write_tree

    root = write_tree(tmp_path / "proj", BASE)
    os.makedirs(root / "pkg", exist_ok=True)
    with open(os.path.join(os.fsencode(root / "pkg"), b"caf\xe9.py"), "w") as f:
        f.write(good_py(500))
    accepted, rejected, stats = scan_folder(home, root)
    assert stats["files"] == 7 and "pkg/caf\udce9.py" in accepted
