"""Sources other than git: uploads, single files, folders, archives; marking test; removing; refreshing."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from refact_lab.data.service import ProjectService
from refact_lab.data.sources import SourceError, SourceStore
from tests.data.conftest import good_py, write_tree


def test_uploads_keep_base_names_only(home):
    store = SourceStore(home)
    src = store.add_files([("a.py", good_py(1).encode()), ("../../etc/b.py", good_py(2).encode()),
                           ("C:\\Users\\me\\c.py", b"x = 3\n")])
    root = Path(src.root)
    assert sorted(p.name for p in root.iterdir()) == ["a.py", "b.py", "c.py"]
    assert src.files == ["a.py", "b.py", "c.py"] and src.kind == "upload"
    assert [r[0] for r in store.files(src)] and all(Path(f).parent == root for _, f, _, _ in store.files(src))


def test_upload_with_two_equal_names_is_refused_and_leaves_nothing(home):
    store = SourceStore(home)
    with pytest.raises(SourceError, match="same name"):
        store.add_files([("a.py", b"1"), ("x/a.py", b"2")])
    assert store.list() == []


def test_service_uploads_split_archives_from_plain_files(home):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("lib/z.py", good_py(9))
    service = ProjectService(home)
    events = []
    service.subscribe(events.append)
    added = service.add_uploads([("code.zip", buf.getvalue()), ("one.py", good_py(1).encode())], test=True)
    assert sorted(s.kind for s in added) == ["archive", "upload"]
    assert all(s.test for s in service.list_sources())
    archive = next(s for s in added if s.kind == "archive")
    assert (Path(archive.root) / "lib/z.py").read_text() == good_py(9)
    assert events == ["sources"]


def test_add_detects_folder_file_archive_and_refuses_missing(home, tmp_path):
    folder = write_tree(tmp_path / "proj", {"a.py": good_py(1)})
    single = write_tree(tmp_path / "one", {"solo.py": good_py(2)}) / "solo.py"
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder / "a.py", arcname="pkg/a.py")
    store = SourceStore(home)
    assert store.add(str(folder)).kind == "folder"
    assert store.add(str(single)).kind == "file"
    assert store.add(str(archive)).kind == "archive"
    with pytest.raises(SourceError, match="no such file or folder, and not a git URL"):
        store.add(str(tmp_path / "missing"))
    assert len(store.list()) == 3


def test_folder_source_is_read_in_place_and_removing_it_keeps_the_folder(home, tmp_path):
    folder = write_tree(tmp_path / "proj", {"a.py": good_py(1), ".git_not_really/x": "y"})
    store = SourceStore(home)
    src = store.add_folder(folder)
    assert src.root == str(folder.resolve())
    store.remove(src.id)
    assert store.list() == [] and (folder / "a.py").is_file()


def test_state_directory_cannot_be_a_source(home):
    with pytest.raises(SourceError, match="state directory"):
        SourceStore(home).add_folder(home.root)


def test_symlinks_in_a_folder_are_not_followed(home, tmp_path):
    secret = write_tree(tmp_path / "secret", {"id_rsa": "-----BEGIN KEY-----\n"}) / "id_rsa"
    folder = write_tree(tmp_path / "proj", {"a.py": good_py(1)})
    (folder / "key.py").symlink_to(secret)
    (folder / "linked_dir").symlink_to(secret.parent)
    store = SourceStore(home)
    src = store.add_folder(folder)
    assert [r[0] for r in store.files(src)] == ["a.py"]


def test_ensure_reuses_a_known_source_and_marks_test(home, tmp_path):
    folder = write_tree(tmp_path / "proj", {"a.py": good_py(1)})
    store = SourceStore(home)
    first = store.ensure(str(folder))
    again = store.ensure(str(folder), test=True)
    assert again.id == first.id and again.test and len(store.list()) == 1


def test_archive_from_a_path_is_re_extracted_when_it_changes(home, tmp_path):
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.py", good_py(1))
    store = SourceStore(home)
    src = store.add_archive(path)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("b.py", good_py(2))
    refreshed = store.refresh(src.id)
    assert sorted(p.name for p in Path(refreshed.root).iterdir()) == ["b.py"]
    assert refreshed.archive_sha256 != src.archive_sha256


def test_only_git_sources_update(home, tmp_path):
    store = SourceStore(home)
    src = store.add_folder(write_tree(tmp_path / "p", {"a.py": "x\n"}))
    with pytest.raises(SourceError, match="only git sources"):
        store.update(src.id)


@pytest.mark.parametrize("damage", [b"[]", b"{}", b"{not json", b'{"id": "x"}'])
def test_a_damaged_source_json_is_an_error_naming_it(home, tmp_path, damage):
    """A source whose source.json was damaged by hand is not dropped from every scan without a word."""
    write_tree(tmp_path / "code", {"a.py": good_py(1)})
    store = SourceStore(home)
    source = store.add(str(tmp_path / "code"))
    (store.dir / source.id / "source.json").write_bytes(damage)
    for read in (store.list, lambda: store.get(source.id)):
        with pytest.raises(SourceError, match="source.json"):
            read()
