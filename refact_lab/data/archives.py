"""Safe extraction of .zip, .tar, .tar.gz, .tgz, .tar.bz2 and .tar.xz archives.

An archive comes from someone else, so nothing in it is trusted:

* every member name must stay inside the destination: no absolute paths, drive letters or `..` steps;
* symbolic links are never created (the scan does not follow links anyway); one that points outside the
  archive is refused, since it only exists to trick an extractor;
* a hard link may only name a file extracted before it, and becomes a copy of that file;
* devices, FIFOs and other special members are skipped; every skipped member is reported with a reason code
  (`symlink`, `special_file`) so the scan can list it among the rejected files;
* memory and disk are bounded twice: from the declared sizes first (a member, a link target or a tar
  extension header that says it is too big is refused before a byte of it is read), then by counting the
  bytes actually written (headers can lie), so a bomb is stopped after at most `max_bytes` bytes written and
  a link or header is never read whole into memory;
* a member larger than the scan's per-file limit (`max_member_bytes`, from `max_file_kib`) is not written out
  at all (nor what a header understates, once past the limit): the scan would only reject it, so it is
  reported as `too_large` instead, and one huge member cannot fill the disk.

Extraction goes into a temporary folder beside the destination and is renamed into place only when every
member has passed; on any error the temporary folder is removed, so nothing half-extracted is left.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_BYTES = 2 * 1024**3      # 2 GiB uncompressed
DEFAULT_MAX_FILES = 200_000
_CHUNK = 1 << 20
# A link target longer than PATH_MAX is not a link target; reading more would only feed a bomb.
MAX_LINK_TARGET = 4096
# tar extension headers (pax records, GNU long names) hold names and a few attributes: a megabyte is plenty,
# and tarfile reads them whole into memory (several copies while parsing), so they are refused above this.
MAX_TAR_HEADER_BYTES = 1 << 20

# Reason codes of skipped members (the scan's rejected list uses the same strings).
SYMLINK = "symlink"
SPECIAL_FILE = "special_file"
TOO_LARGE = "too_large"

ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")


class ArchiveError(ValueError):
    """The archive is corrupt, unsafe or too big; the message says which member and why."""


@dataclass
class ExtractReport:
    files: int = 0
    bytes: int = 0
    # (member path, reason code, detail) of every member not extracted: links inside, devices, FIFOs, files
    # over the per-file limit
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def is_archive(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(ARCHIVE_SUFFIXES)


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_member_path(name: str) -> str:
    """The member's path relative to the destination, or ArchiveError if it would land outside."""
    norm = name.replace("\\", "/")   # archives made on Windows use backslashes; treat them as separators
    if norm.startswith("/") or _DRIVE.match(norm):
        raise ArchiveError(f"member {name!r} has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r} escapes the extraction folder (path traversal)")
    return "/".join(parts)


def _link_target_inside(member: str, target: str) -> bool:
    """Resolve a symlink target against the member's own folder, lexically, and say if it stays inside."""
    target = target.replace("\\", "/")
    if target.startswith("/") or _DRIVE.match(target):
        return False
    depth = 0
    for part in member.split("/")[:-1] + target.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return False
    return True


def _member_path(archive: str, name: str) -> str:
    """safe_member_path, with the archive named in the error."""
    try:
        return safe_member_path(name)
    except ArchiveError as e:
        raise ArchiveError(f"{archive}: {e}") from None


class _Budget:
    """Counts members and bytes written; raises as soon as either bound is passed. Also leaves out (and
    reports) a member over the per-file limit, `max_member` (None: no such limit), unless it is in `keep`."""

    def __init__(self, archive: str, max_bytes: int, max_files: int, max_member: int | None = None,
                 keep: frozenset = frozenset()):
        self.archive, self.max_bytes, self.max_files, self.max_member = archive, max_bytes, max_files, max_member
        self.keep = keep   # member paths extracted whatever their size (force-included by the user)
        self.report = ExtractReport()
        self.members = 0
        self.left_out: dict[str, str] = {}   # member path -> detail, of those over the per-file limit

    def member(self) -> None:
        self.members += 1
        if self.members > self.max_files:
            raise ArchiveError(f"{self.archive}: more than {self.max_files} members; refused (a bomb, or raise "
                               "the limit)")

    def declared(self, name: str, size: int) -> None:
        """Refuse a member from its header before reading it, when what it declares cannot fit."""
        if self.report.bytes + size > self.max_bytes:
            raise ArchiveError(f"{self.archive}: member {name!r} declares {_mib(size)}, more than the "
                               f"{_mib(self.max_bytes - self.report.bytes)} left of the {_mib(self.max_bytes)} "
                               "limit; refused (a bomb, or raise the limit)")

    def add(self, n: int) -> None:
        self.report.bytes += n
        if self.report.bytes > self.max_bytes:
            raise ArchiveError(f"{self.archive}: more than {_mib(self.max_bytes)} uncompressed; refused "
                               "(a zip bomb, or raise the limit)")

    def too_large(self, rel: str, size: int | None) -> bool:
        """True, with the member reported as too_large, when `size` (None: more than the header said, found
        while writing) is over the per-file limit."""
        if self.max_member is None or rel in self.keep or (size is not None and size <= self.max_member):
            return False
        what = f"more than {_kib(self.max_member)}" if size is None else f"{_kib(size)} > {_kib(self.max_member)}"
        self.left_out[rel] = f"{what}, the scan's file size limit; not extracted"
        self.report.skipped.append((rel, TOO_LARGE, self.left_out[rel]))
        return True


def _write_stream(src, target: Path, budget: _Budget, rel: str = "") -> bool:
    """Copy member `rel` out. False, and nothing kept, when it proves larger than the per-file limit (a zip
    header can understate a member's size)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise ArchiveError(f"{budget.archive}: member {target.name!r} is both a folder and a file")
    limit = None if rel in budget.keep else budget.max_member
    written = 0
    with open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if limit is not None and written > limit:
                break
            budget.add(len(chunk))
            dst.write(chunk)
        else:
            budget.report.files += 1
            return True
    target.unlink()
    return False


def _extract_zip(path: Path, out: Path, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{path.name}: not a valid zip archive ({_why(e)})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > budget.max_files:
            raise ArchiveError(f"{path.name}: {len(infos)} members, more than {budget.max_files}; refused")
        declared = sum(i.file_size for i in infos)
        if declared > budget.max_bytes:
            raise ArchiveError(f"{path.name}: declares {_mib(declared)} uncompressed, more than "
                               f"{_mib(budget.max_bytes)}; refused (a zip bomb, or raise the limit)")
        for info in infos:
            budget.member()
            rel = _member_path(path.name, info.filename)
            if not rel:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                target = _zip_link_target(zf, info, path.name)
                if not _link_target_inside(rel, target):
                    raise ArchiveError(f"{path.name}: symlink {info.filename!r} points outside ({target!r})")
                budget.report.skipped.append((rel, SYMLINK, f"symbolic link to {target!r}, not followed"))
                continue
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                budget.report.skipped.append((rel, SPECIAL_FILE, f"{file_kind(mode)} member, not extracted"))
                continue
            if info.is_dir():
                (out / rel).mkdir(parents=True, exist_ok=True)
                continue
            if info.flag_bits & 0x1:
                raise ArchiveError(f"{path.name}: member {info.filename!r} is encrypted")
            budget.declared(info.filename, info.file_size)
            if budget.too_large(rel, info.file_size):
                continue
            try:
                with zf.open(info) as src:
                    if not _write_stream(src, out / rel, budget, rel):
                        budget.too_large(rel, None)
            except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, ValueError) as e:
                if isinstance(e, ArchiveError):
                    raise
                raise ArchiveError(f"{path.name}: cannot read member {info.filename!r} ({_why(e)})") from None


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str) -> str:
    """A zip symlink's target, read at most MAX_LINK_TARGET + 1 bytes whatever its header says."""
    if info.file_size > MAX_LINK_TARGET:
        raise ArchiveError(f"{archive}: symlink {info.filename!r} declares a {_mib(info.file_size)} target, more "
                           f"than the {MAX_LINK_TARGET} bytes a link can hold; refused")
    try:
        with zf.open(info) as src:
            data = src.read(MAX_LINK_TARGET + 1)
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, ValueError) as e:
        raise ArchiveError(f"{archive}: cannot read symlink {info.filename!r} ({_why(e)})") from None
    if len(data) > MAX_LINK_TARGET:
        raise ArchiveError(f"{archive}: symlink {info.filename!r} has a target longer than {MAX_LINK_TARGET} "
                           "bytes; refused")
    return data.decode("utf-8", "replace")


def file_kind(mode: int) -> str:
    """What kind of not-a-regular-file a mode names, for the detail of a `special_file` rejection."""
    for test, what in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return what
    return "special file"


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an oversized extension header from its declared size, before tarfile reads
    the header whole into memory (`_proc_member` is tarfile's documented hook for subclasses)."""

    _EXTENSION_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                        tarfile.GNUTYPE_LONGLINK)

    def _proc_member(self, tarfile_):
        if self.type in self._EXTENSION_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise ArchiveError(f"an extension header (pax or long name) of {_mib(self.size)}, more than "
                               f"{_mib(MAX_TAR_HEADER_BYTES)}; refused (a bomb)")
        return super()._proc_member(tarfile_)


def _tar_mode(name: str) -> tuple[str, str]:
    """Open with the compression the name promises, so a corrupt file gets that one error, not four."""
    for suffixes, mode, what in (((".tar.gz", ".tgz"), "r:gz", "tar.gz"), ((".tar.bz2", ".tbz2"), "r:bz2", "tar.bz2"),
                                 ((".tar.xz", ".txz"), "r:xz", "tar.xz")):
        if name.endswith(suffixes):
            return mode, what
    return "r:", "tar"


def _why(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__   # one line, whatever the library wrote


def _extract_tar(path: Path, out: Path, budget: _Budget) -> None:
    mode, what = _tar_mode(path.name.lower())
    try:
        tf = tarfile.open(path, mode, tarinfo=_BoundedTarInfo)
    except ArchiveError as e:
        raise ArchiveError(f"{path.name}: {e}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"{path.name}: not a valid {what} archive ({_why(e)})") from None
    written: set[str] = set()
    with tf:
        while True:
            try:
                member = tf.next()
            except ArchiveError as e:
                raise ArchiveError(f"{path.name}: {e}") from None
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                raise ArchiveError(f"{path.name}: corrupt {what} archive ({_why(e)})") from None
            if member is None:
                break
            budget.member()
            rel = _member_path(path.name, member.name)
            if not rel:
                continue
            if member.issym():
                if not _link_target_inside(rel, member.linkname):
                    raise ArchiveError(f"{path.name}: symlink {member.name!r} points outside "
                                       f"({member.linkname!r})")
                budget.report.skipped.append((rel, SYMLINK, f"symbolic link to {member.linkname!r}, not followed"))
            elif member.islnk():
                try:
                    target = safe_member_path(member.linkname)
                except ArchiveError:
                    raise ArchiveError(f"{path.name}: hard link {member.name!r} points outside "
                                       f"({member.linkname!r})") from None
                if target in budget.left_out:   # a copy of a member too large to extract is as large
                    budget.report.skipped.append((rel, TOO_LARGE, budget.left_out[target]))
                    continue
                if target not in written:
                    budget.report.skipped.append((rel, SPECIAL_FILE, f"hard link to {member.linkname!r}, not a "
                                                                     "file extracted before it"))
                    continue
                size = (out / target).stat().st_size
                budget.declared(member.name, size)
                if budget.too_large(rel, size):
                    continue
                with open(out / target, "rb") as src:
                    _write_stream(src, out / rel, budget, rel)
                written.add(rel)
            elif member.isdir():
                (out / rel).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                budget.declared(member.name, member.size)
                if budget.too_large(rel, member.size):
                    continue   # tarfile skips the member's data when asked for the next one
                try:
                    src = tf.extractfile(member)
                    _write_stream(src, out / rel, budget, rel)   # a tar member holds what its header says
                except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                    if isinstance(e, ArchiveError):
                        raise
                    raise ArchiveError(f"{path.name}: cannot read member {member.name!r} ({_why(e)})") from None
                written.add(rel)
            else:
                what = ("FIFO" if member.isfifo() else "character device" if member.ischr()
                        else "block device" if member.isblk() else f"type {member.type!r}")
                budget.report.skipped.append((rel, SPECIAL_FILE, f"{what} member, not extracted"))


def extract(archive: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
            max_files: int = DEFAULT_MAX_FILES, max_member_bytes: int | None = None,
            keep: frozenset = frozenset()) -> ExtractReport:
    """Extract `archive` into the new folder `dest` (which must not exist), all or nothing. Members larger than
    `max_member_bytes` are left out and reported as `too_large`, except those named in `keep`."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such file")
    if dest.exists():
        raise ArchiveError(f"{dest} already exists")
    name = archive.name.lower()
    if not is_archive(name):
        raise ArchiveError(f"{archive.name}: not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    budget = _Budget(archive.name, max_bytes, max_files, max_member_bytes, frozenset(keep))
    try:
        if name.endswith(".zip"):
            _extract_zip(archive, tmp, budget)
        else:
            _extract_tar(archive, tmp, budget)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArchiveError(f"{archive.name}: cannot extract ({_why(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return budget.report


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB" if n >= 1024**2 else f"{n} bytes"


def _kib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB" if n >= 10 * 1024**2 else f"{n / 1024:.0f} KiB"
