"""Archive memory bombs, and traversal hidden in the middle of a path.

The bombs are built on the fly and are small on disk (a long run of one byte compresses ~1000:1). Memory is
measured as the peak RSS (VmHWM) of a fresh Python process that extracts the archive, so the numbers are
not polluted by the test runner; a refusal must come with a reason naming what was too big.
"""

from __future__ import annotations

import gzip
import io
import json
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from refact_lab.data import archives
from refact_lab.data.archives import ArchiveError, extract

MIB = 1024 * 1024
# A fresh interpreter that imports the extractor peaks at ~20 MiB here; reading any bomb whole costs more than
# the bomb itself (tarfile and zipfile keep copies), so a bound far below the bomb's size shows it was not read.
RSS_BOUND_MIB = 100

# VmHWM is the peak of this process's own address space; ru_maxrss is not (Linux carries the parent's peak
# across fork + exec, so a large test runner would show through).
_EXTRACT = """
import json, sys
from refact_lab.data.archives import ArchiveError, extract
try:
    extract(sys.argv[1], sys.argv[2])
    outcome = "extracted"
except ArchiveError as e:
    outcome = "refused: " + str(e)
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "maxrss_mib": hwm_kib / 1024}))
"""


def _extract_in_child(archive: Path, dest: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _EXTRACT, str(archive), str(dest)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _zip_with_symlink_member(path: Path, target_bytes: int) -> Path:
    """A zip whose one member is marked as a symlink and holds `target_bytes` of 'a' (deflated, streamed)."""
    info = zipfile.ZipInfo("pkg/link.py")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = b"a" * MIB
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/ok.py", "x = 1\n")
        with zf.open(info, "w", force_zip64=True) as member:
            for _ in range(target_bytes // MIB):
                member.write(chunk)
    return path


def _tar_with_pax_header(path: Path, header_bytes: int) -> Path:
    """A .tar.gz whose first member carries a pax extension header of `header_bytes` (one huge `comment`
    record), streamed through gzip so the test never holds it in memory."""
    head = tarfile.TarInfo("././@PaxHeader")
    head.type = tarfile.XHDTYPE
    head.size = header_bytes
    prefix = f"{header_bytes} comment=".encode()
    value = header_bytes - len(prefix) - 1
    ok = tarfile.TarInfo("pkg/ok.py")
    ok.size = 6
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(head.tobuf(tarfile.USTAR_FORMAT))
        f.write(prefix)
        for start in range(0, value, MIB):
            f.write(b"x" * min(MIB, value - start))
        f.write(b"\n" + b"\0" * (-header_bytes % 512))
        f.write(ok.tobuf(tarfile.USTAR_FORMAT) + b"x = 1\n".ljust(512, b"\0") + b"\0" * 1024)
    return path


def test_zip_symlink_member_is_refused_from_its_declared_size_without_reading_it(tmp_path):
    path = _zip_with_symlink_member(tmp_path / "link-bomb.zip", 192 * MIB)
    assert path.stat().st_size < 2 * MIB
    result = _extract_in_child(path, tmp_path / "out")
    assert result["outcome"].startswith("refused: link-bomb.zip: symlink 'pkg/link.py' declares a 192 MiB target")
    assert result["maxrss_mib"] < RSS_BOUND_MIB, result
    assert not (tmp_path / "out").exists()


def test_zip_symlink_target_is_read_bounded_even_when_its_size_is_plausible(tmp_path, monkeypatch):
    path = tmp_path / "links.zip"
    info = zipfile.ZipInfo("pkg/alias.py")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/a.py", "x = 1\n")
        zf.writestr(info, "a.py")
    asked = []
    real_open = zipfile.ZipFile.open

    def spying_open(self, name, *args, **kwargs):
        handle = real_open(self, name, *args, **kwargs)
        real_read = handle.read
        member = getattr(name, "filename", name)
        handle.read = lambda n=-1: asked.append((member, n)) or real_read(n)
        return handle

    monkeypatch.setattr(zipfile.ZipFile, "open", spying_open)
    report = extract(path, tmp_path / "out")
    assert report.skipped == [("pkg/alias.py", "symlink", "symbolic link to 'a.py', not followed")]
    # the link is read with a bound, never read(-1) whole
    assert [n for member, n in asked if member == "pkg/alias.py"] == [archives.MAX_LINK_TARGET + 1]


def test_tar_with_a_huge_pax_header_is_refused_before_it_is_read(tmp_path):
    path = _tar_with_pax_header(tmp_path / "pax-bomb.tar.gz", 128 * MIB)
    assert path.stat().st_size < 2 * MIB
    result = _extract_in_child(path, tmp_path / "out")
    assert result["outcome"] == ("refused: pax-bomb.tar.gz: an extension header (pax or long name) of 128 MiB, "
                                 "more than 1 MiB; refused (a bomb)")
    assert result["maxrss_mib"] < RSS_BOUND_MIB, result
    assert not (tmp_path / "out").exists()


def test_a_small_pax_header_still_extracts(tmp_path):
    path = _tar_with_pax_header(tmp_path / "pax-ok.tar.gz", 4096)
    report = extract(path, tmp_path / "out")
    assert report.files == 1 and (tmp_path / "out/pkg/ok.py").read_text() == "x = 1\n"


def test_tar_member_declaring_3_gib_is_refused_before_a_byte_is_written(tmp_path, monkeypatch):
    # The header says 3 GiB; only 2 MiB follow (the archive is small on disk). Today's limit is 2 GiB.
    info = tarfile.TarInfo("pkg/huge.bin")
    info.size = 3 * 1024**3
    path = tmp_path / "huge.tar"
    path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * (2 * MIB))
    written = []
    real = archives._write_stream
    monkeypatch.setattr(archives, "_write_stream", lambda src, target, budget: written.append(target) or
                        real(src, target, budget))
    with pytest.raises(ArchiveError, match=r"member 'pkg/huge.bin' declares 3072 MiB, more than the 2048 MiB left"):
        extract(path, tmp_path / "out")
    assert written == [] and not (tmp_path / "out").exists()


def test_zip_member_declaring_more_than_is_left_is_refused_before_writing(tmp_path):
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", b"\0" * (3 * MIB))
        zf.writestr("b.bin", b"\0" * (3 * MIB))
    # the declared total (6 MiB) is checked first; with room for it, each member is checked as it comes
    with pytest.raises(ArchiveError, match="declares 6 MiB uncompressed"):
        extract(path, tmp_path / "out", max_bytes=5 * MIB)
    budget = archives._Budget("two.zip", 5 * MIB, 10)
    budget.add(3 * MIB)
    with pytest.raises(ArchiveError, match="member 'b.bin' declares 3 MiB, more than the 2 MiB left"):
        budget.declared("b.bin", 3 * MIB)


def test_the_running_byte_count_still_stops_what_headers_understate(tmp_path):
    budget = archives._Budget("lies.tar", 4 * MIB, 10)
    budget.declared("small.bin", 10)   # what the header claims passes...
    with pytest.raises(ArchiveError, match="more than 4 MiB uncompressed"):
        archives._write_stream(io.BytesIO(b"\0" * (5 * MIB)), tmp_path / "small.bin", budget)  # ...the bytes don't


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("name", ["pkg/../../evil.py", "pkg/sub/../../../evil.py", "./pkg/./../../evil.py"])
def test_traversal_in_the_middle_of_a_path_is_refused(tmp_path, kind, name):
    dest = tmp_path / "a" / "b" / "out"
    path = tmp_path / f"mid.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("pkg/ok.py", "x = 1\n")
            zf.writestr(name, "import os\n")
    else:
        with tarfile.open(path, "w") as tf:
            for member, data in (("pkg/ok.py", b"x = 1\n"), (name, b"import os\n")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="escapes the extraction folder"):
        extract(path, dest)
    assert not list(tmp_path.rglob("evil.py")) and not dest.exists()


def test_dotdot_inside_a_name_is_not_traversal():
    assert archives.safe_member_path("pkg/..hidden/a..b.py") == "pkg/..hidden/a..b.py"
    assert archives.safe_member_path("./pkg//x.py") == "pkg/x.py"


def test_special_tar_members_are_reported_with_reason_codes(tmp_path):
    path = tmp_path / "special.tar"
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("pkg/a.py")
        ok.size = 6
        tf.addfile(ok, io.BytesIO(b"x = 1\n"))
        for name, kind in (("pkg/pipe", tarfile.FIFOTYPE), ("pkg/tty", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tf.addfile(info)
        link = tarfile.TarInfo("pkg/b.py")
        link.type, link.linkname = tarfile.SYMTYPE, "a.py"
        tf.addfile(link)
    report = extract(path, tmp_path / "out")
    assert sorted(report.skipped) == [
        ("pkg/b.py", "symlink", "symbolic link to 'a.py', not followed"),
        ("pkg/pipe", "special_file", "FIFO member, not extracted"),
        ("pkg/tty", "special_file", "character device member, not extracted")]
    assert sorted(p.name for p in (tmp_path / "out/pkg").iterdir()) == ["a.py"]


def _one_huge_member(path: Path, size: int) -> Path:
    """A zip or tar.gz holding a small file and one `size`-byte member of one byte repeated, streamed."""
    chunk = b"#" * MIB
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("pkg/ok.py", "x = 1\n")
            with zf.open("pkg/huge.py", "w", force_zip64=True) as member:
                for _ in range(size // MIB):
                    member.write(chunk)
        return path

    class Repeated:   # the member's content, read in pieces, never held in memory whole
        left = size

        def read(self, n):
            n = min(n, self.left)
            self.left -= n
            return b"#" * n

    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        ok = tarfile.TarInfo("pkg/ok.py")
        ok.size = 6
        tf.addfile(ok, io.BytesIO(b"x = 1\n"))
        huge = tarfile.TarInfo("pkg/huge.py")
        huge.size = size
        tf.addfile(huge, Repeated())
    return path


@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_a_member_over_the_file_size_limit_is_reported_too_large_and_never_written(tmp_path, name):
    path = _one_huge_member(tmp_path / name, 64 * MIB)
    assert path.stat().st_size < 2 * MIB
    report = extract(path, tmp_path / "out", max_member_bytes=512 * 1024)
    assert report.skipped == [("pkg/huge.py", "too_large", "64 MiB > 512 KiB, the scan's file size limit; not "
                                                            "extracted")]
    assert report.files == 1 and report.bytes == 6
    assert sorted(p.name for p in (tmp_path / "out/pkg").iterdir()) == ["ok.py"]


def test_a_member_bigger_than_its_header_says_is_dropped_at_the_file_size_limit(tmp_path):
    budget = archives._Budget("lies.zip", 4 * MIB, 10, max_member=MIB)
    budget.declared("small.py", 10)   # what the header claims passes...
    assert not archives._write_stream(io.BytesIO(b"#" * (3 * MIB)), tmp_path / "small.py", budget, "small.py")
    assert not (tmp_path / "small.py").exists() and budget.report.bytes <= MIB   # ...the bytes are not kept
    assert budget.too_large("small.py", None)
    assert budget.report.skipped == [("small.py", "too_large", "more than 1024 KiB, the scan's file size limit; "
                                                              "not extracted")]


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("name,error", [("../../evil.py", "escapes the extraction folder"),
                                        ("/tmp/refact-lab-absolute.py", "has an absolute path")])
def test_path_errors_name_the_archive(tmp_path, kind, name, error):
    path = tmp_path / f"named.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(name, "import os\n")
    else:
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo(name)
            info.size = 10
            tf.addfile(info, io.BytesIO(b"import os\n"))
    with pytest.raises(ArchiveError, match=rf"^named\.{kind}: member '{name}' {error}"):
        extract(path, tmp_path / "out")
