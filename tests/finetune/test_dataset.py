"""The dataset reader: accepted.jsonl records -> texts per set, skipping files changed since the scan."""

import codecs
import json

import pytest

from refact_lab.finetune.dataset import available_projects, load_dataset
from tests.finetune.conftest import STDLIB, TEST_FILES, TRAIN_FILES, write_dataset


def test_reads_train_and_test_texts(home, stdlib_project):
    ds = load_dataset(home, stdlib_project)
    assert [f.key for f in ds.test] == [f"stdlib/{n}" for n in TEST_FILES]
    assert len(ds.train) == len(TRAIN_FILES)
    assert ds.train[0].text == (STDLIB / TRAIN_FILES[0]).read_text()
    assert available_projects(home) == ["stdlib"]
    assert "16 train files" in ds.summary()


def test_changed_and_missing_files_are_skipped_with_a_reason(home, stdlib_project):
    src = home.sources_dir(stdlib_project) / "stdlib"
    (src / TRAIN_FILES[0]).write_text("changed after the scan\n")
    (src / TRAIN_FILES[1]).unlink()
    ds = load_dataset(home, stdlib_project)
    assert len(ds.train) == len(TRAIN_FILES) - 2
    assert any("sha256 differs" in s for s in ds.skipped) and any("not found" in s for s in ds.skipped)
    assert "2 skipped" in ds.summary()


def test_a_local_folder_source_is_read_where_the_scan_found_it(home, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "a.py").write_text("print('a')\n")
    (folder / "b.py").write_text("print('b')\n")
    scan = home.scan_dir("local")
    scan.mkdir(parents=True)
    records = [{"source": "repo-1", "path": name, "file": str(folder / name), "set": which, "size": 11}
               for name, which in (("a.py", "train"), ("b.py", "test"))]
    (scan / "accepted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = load_dataset(home, "local")
    assert [f.text for f in ds.train] == ["print('a')\n"] and [f.text for f in ds.test] == ["print('b')\n"]


def test_without_test_files_a_deterministic_tenth_is_held_out(home):
    write_dataset(home, "notest", {"train": TRAIN_FILES})
    a, b = load_dataset(home, "notest"), load_dataset(home, "notest")
    assert len(a.test) == 2 and len(a.train) == len(TRAIN_FILES) - 2
    assert [f.key for f in a.test] == [f.key for f in b.test]
    assert "held out 2" in a.notes[0]


def test_missing_dataset_is_a_clear_error(home):
    with pytest.raises(FileNotFoundError, match="has no scanned dataset.*run a scan first"):
        load_dataset(home, "nothing")


def test_dataset_from_the_real_scan_pipeline(home, tmp_path):
    """When the scan exists, its accepted.jsonl is what we read (no hand-written records)."""
    service = pytest.importorskip("refact_lab.data.service")
    folder = tmp_path / "code"
    for name in TRAIN_FILES[:6] + TEST_FILES[:1]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text((STDLIB / name).read_text())
    project = service.ProjectService(home, "scanned")
    project.add_folder(str(folder))
    from refact_lab.config import ScanSettings

    project.run_scan(ScanSettings(lm_filter=False))
    ds = load_dataset(home, "scanned")
    assert len(ds.train) + len(ds.test) >= 5
    assert not ds.skipped
    assert all(f.text == (STDLIB / f.key.split("/", 1)[1]).read_text() for f in ds.train + ds.test)


def test_training_reads_each_file_as_the_scan_decoded_it(home, tmp_path):
    """A UTF-16 file is text by its byte-order mark, for the scan and for training alike; no BOM is trained on."""
    service = pytest.importorskip("refact_lab.data.service")
    folder = tmp_path / "code"
    for name in TRAIN_FILES[:4]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text((STDLIB / name).read_text())
    texts = {rel: (STDLIB / name).read_text() for rel, name in zip(("utf16.py", "utf16be.py", "bom.py"), TEST_FILES)}
    (folder / "utf16.py").write_bytes(texts["utf16.py"].encode("utf-16"))   # BOM, then the machine's byte order
    (folder / "utf16be.py").write_bytes(codecs.BOM_UTF16_BE + texts["utf16be.py"].encode("utf-16-be"))
    (folder / "bom.py").write_bytes(texts["bom.py"].encode("utf-8-sig"))
    project = service.ProjectService(home, "encodings")
    project.add_folder(str(folder))
    from refact_lab.config import ScanSettings

    project.run_scan(ScanSettings(lm_filter=False))
    ds = load_dataset(home, "encodings")
    read = {f.key.split("/", 1)[1]: f.text for f in ds.train + ds.test}
    assert {rel: read.get(rel) for rel in texts} == texts
