"""Archives: every supported format extracts; every attack is refused with nothing left behind."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from refact_lab.data import archives
from refact_lab.data.archives import ArchiveError, extract
from refact_lab.data.sources import SourceError, SourceStore
from tests.data.conftest import good_py

FILES = {"pkg/a.py": good_py(1), "pkg/b.py": good_py(2), "README.md": "# demo\n"}


def _tar(path: Path, mode: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _nothing_left(parent: Path, dest: Path) -> bool:
    return not dest.exists() and not [p for p in parent.iterdir() if ".extract-" in p.name]


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz"),
                                         (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz"), (".zip", None)])
def test_every_format_extracts(tmp_path, suffix, mode):
    path = tmp_path / f"src{suffix}"
    if mode is None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in FILES.items():
                zf.writestr(name, text)
    else:
        _tar(path, mode, [_file(n, t.encode()) for n, t in FILES.items()])
    report = extract(path, tmp_path / "out")
    assert report.files == 3
    for name, text in FILES.items():
        assert (tmp_path / "out" / name).read_text() == text


def test_zip_slip_is_refused_and_nothing_is_left(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/ok.py", "x = 1\n")
        zf.writestr("../../evil.py", "import os\n")
    out = tmp_path / "dest" / "files"
    with pytest.raises(ArchiveError, match="escapes"):
        extract(path, out)
    assert _nothing_left(out.parent, out)
    assert not (tmp_path / "evil.py").exists()


def test_backslash_traversal_from_windows_archives_is_refused(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("..\\..\\evil.py", "x\n")
    with pytest.raises(ArchiveError, match="escapes"):
        extract(path, tmp_path / "out")


def test_absolute_paths_are_refused(tmp_path):
    path = _tar(tmp_path / "abs.tar", "w", [_file("/tmp/refact-lab-absolute.py", b"x = 1\n")])
    with pytest.raises(ArchiveError, match="absolute path"):
        extract(path, tmp_path / "out")
    assert _nothing_left(tmp_path, tmp_path / "out")


def test_tar_symlink_escape_is_refused(tmp_path):
    path = _tar(tmp_path / "link.tar.gz", "w:gz", [_file("pkg/a.py", b"x = 1\n"), _link("pkg/passwd", "/etc/passwd")])
    with pytest.raises(ArchiveError, match="symlink 'pkg/passwd' points outside"):
        extract(path, tmp_path / "out")
    assert _nothing_left(tmp_path, tmp_path / "out")
    path = _tar(tmp_path / "rel.tar", "w", [_link("pkg/up", "../../../home")])
    with pytest.raises(ArchiveError, match="points outside"):
        extract(path, tmp_path / "out")


def test_symlink_then_write_through_it_is_refused(tmp_path):
    # The classic two-step: a link to a folder outside, then a file "inside" the link.
    path = _tar(tmp_path / "two.tar", "w", [_link("d", "/tmp"), _file("d/pwned.py", b"x\n")])
    with pytest.raises(ArchiveError):
        extract(path, tmp_path / "out")
    assert not Path("/tmp/pwned.py").exists()


def test_symlink_inside_is_skipped_not_created(tmp_path):
    path = _tar(tmp_path / "ok.tar", "w", [_file("pkg/a.py", b"x = 1\n"), _link("pkg/alias.py", "a.py")])
    report = extract(path, tmp_path / "out")
    assert (tmp_path / "out/pkg/a.py").is_file()
    assert not os.path.lexists(tmp_path / "out/pkg/alias.py")
    assert [(p, code) for p, code, _ in report.skipped] == [("pkg/alias.py", "symlink")]


def test_zip_symlink_escape_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("pkg/key")
        info.external_attr = (0o120777 << 16)  # S_IFLNK: how zip stores a symlink
        zf.writestr(info, "/root/.ssh/id_rsa")
    with pytest.raises(ArchiveError, match="points outside"):
        extract(path, tmp_path / "out")


def test_hardlink_escape_is_refused(tmp_path):
    path = _tar(tmp_path / "hard.tar", "w", [_file("a.py", b"x\n"), _link("b.py", "../../etc/passwd", tarfile.LNKTYPE)])
    with pytest.raises(ArchiveError, match="hard link 'b.py' points outside"):
        extract(path, tmp_path / "out")
    assert _nothing_left(tmp_path, tmp_path / "out")


def test_hardlink_inside_becomes_a_copy(tmp_path):
    path = _tar(tmp_path / "hard.tar", "w", [_file("a.py", b"x = 1\n"), _link("b.py", "a.py", tarfile.LNKTYPE)])
    extract(path, tmp_path / "out")
    a, b = tmp_path / "out/a.py", tmp_path / "out/b.py"
    assert b.read_bytes() == b"x = 1\n" and os.stat(a).st_ino != os.stat(b).st_ino


def test_zip_bomb_by_size_is_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.txt", b"\0" * (8 * 1024 * 1024))     # compresses to a few KiB
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(ArchiveError, match="zip bomb"):
        extract(path, tmp_path / "out", max_bytes=1024 * 1024)
    assert _nothing_left(tmp_path, tmp_path / "out")


def test_bomb_of_honest_members_is_refused_from_the_declared_sizes(tmp_path):
    # A tar.gz whose members are honest but large: the third would pass the budget, so it is refused from its
    # header before a byte of it is written.
    data = b"\0" * (3 * 1024 * 1024)
    path = _tar(tmp_path / "bomb.tar.gz", "w:gz", [_file(f"f{i}.bin", data) for i in range(3)])
    with pytest.raises(ArchiveError, match="declares 3 MiB"):
        extract(path, tmp_path / "out", max_bytes=4 * 1024 * 1024)
    assert _nothing_left(tmp_path, tmp_path / "out")


def test_bomb_by_file_count_is_refused(tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(300):
            zf.writestr(f"f{i}.py", "")
    with pytest.raises(ArchiveError, match="members"):
        extract(path, tmp_path / "out", max_files=100)
    tpath = _tar(tmp_path / "many.tar", "w", [_file(f"f{i}.py", b"") for i in range(300)])
    with pytest.raises(ArchiveError, match="more than 100 members"):
        extract(tpath, tmp_path / "out2", max_files=100)
    assert _nothing_left(tmp_path, tmp_path / "out2")


@pytest.mark.parametrize("name,data", [("broken.zip", b"PK\x03\x04 not really a zip"),
                                       ("broken.tar.gz", b"\x1f\x8b\x08\x00 truncated gzip"),
                                       ("empty.tar.xz", b"")])
def test_corrupt_archives_give_a_clear_error(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match=name.replace(".", r"\.")):
        extract(path, tmp_path / "out")
    assert _nothing_left(tmp_path, tmp_path / "out")


def test_archive_source_leaves_no_source_folder_on_failure(home, tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../evil.py", "x\n")
    store = SourceStore(home)
    with pytest.raises(SourceError, match="escapes"):
        store.add_archive(path)
    assert store.list() == []
    assert not list(store.dir.iterdir())


def test_archive_source_respects_store_limits(home, tmp_path):
    path = tmp_path / "big.tar.gz"
    _tar(path, "w:gz", [_file("big.py", b"# x\n" * 300_000)])
    store = SourceStore(home, max_archive_bytes=100_000)
    with pytest.raises(SourceError, match="declares 1 MiB"):
        store.add_archive(path)
    assert store.list() == []


def test_is_archive_suffixes():
    assert all(archives.is_archive(f"x{s}") for s in (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))
    assert not archives.is_archive("x.gz") and not archives.is_archive("x.py")
