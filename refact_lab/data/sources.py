"""Sources of a project: git repositories, archives, uploaded files and local folders.

Each source lives in `projects/<project>/sources/<id>/` with a `source.json` (kind, origin, branch, whether it
is held out as test...) and its files: `repo/` for a clone, `files/` for an extracted archive or uploads. A
local folder is read in place and only its path is recorded. `source.json` is written last, atomically, so a
failed add leaves no half-made source: the folder is removed and the error says why.

A token for a private https repository is kept next to the clone in `secret.json` (0600), never in
`source.json` or git's config, and is removed with the source.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import re
import secrets
import shutil
import stat
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from refact_lab.config import ScanSettings
from refact_lab.data import archives, gitsource, sshkeys
from refact_lab.data.filters import LINGUIST_ERROR
from refact_lab.home import (DEFAULT_PROJECT, Home, atomic_write_bytes, atomic_write_json, check_name, read_json,
                             read_json_object)

KINDS = ("git", "archive", "upload", "file", "folder")
VCS_DIRS = frozenset({".git", ".hg", ".svn", ".bzr"})
# Archive members larger than the scan's file size limit are not extracted (the scan would only reject them as
# too_large, and a bomb's one huge member would fill the disk). Until a scan asks for another, the default limit.
DEFAULT_MAX_MEMBER_BYTES = ScanSettings().max_file_kib * 1024


class SourceError(ValueError):
    """A source cannot be added or refreshed: missing path, refused or unreachable URL, corrupt archive."""


@dataclass
class Source:
    id: str
    kind: str                          # git | archive | upload | file | folder
    origin: str                        # URL, path, or the uploaded names
    name: str                          # short label for lists
    root: str                          # absolute folder whose files are scanned
    test: bool = False                 # held out: every file of it goes to the test set
    branch: str | None = None
    shallow: bool = False
    auth: str | None = None            # "token" | "ssh-key" | None
    commit: str | None = None
    archive_sha256: str | None = None
    added_at: str = ""
    updated_at: str | None = None
    last_update: dict | None = None    # {"from", "to", "changed": n}
    files: list[str] = field(default_factory=list)   # upload: the names it holds
    # archive: members not extracted, as [path, reason code, detail] (links, devices, too large), so the scan
    # lists them; member_limit is the per-file limit (bytes) it was extracted under
    skipped: list[list[str]] = field(default_factory=list)
    member_limit: int | None = None

    @property
    def label(self) -> str:
        tag = " [test]" if self.test else ""
        extra = f" @{self.branch}" if self.branch else ""
        return f"{self.kind}: {self.name}{extra}{tag}"


def _now() -> str:
    # Microseconds: sources are listed in the order they were added, even several in one millisecond (two
    # folders added back to back can be; the order decides which of two equal files is the duplicate).
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _slug(text: str) -> str:
    base = re.sub(r"\.git$", "", text.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
    for suffix in archives.ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.")[:32] or "source"


def _safe_upload_name(name: str) -> str:
    """An uploaded file keeps its base name only; the browser's path parts are not trusted."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if base in ("", ".", "..") or "\0" in base:
        raise SourceError(f"invalid file name {name!r}")
    return base


def _not_a_file(path: str, mode: int) -> tuple[str, str]:
    """(reason code, detail) of something in a source that is not a regular file: a link or a special file."""
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return archives.SYMLINK, f"symbolic link to {target!r}, not followed"
    return archives.SPECIAL_FILE, f"{archives.file_kind(mode)}, not a regular file"


def _record_unreadable(skipped: list | None, rel: str, what: str, err: OSError) -> None:
    """Record what could not be listed or looked at, so it is rejected with the reason instead of vanishing.
    Something deleted while the scan lists it is simply gone and is not recorded."""
    if skipped is not None and not isinstance(err, FileNotFoundError):
        skipped.append((rel, LINGUIST_ERROR, f"{what}: {err.strerror or err}"))


def walk_files(root: Path, skipped: list | None = None) -> Iterator[tuple[str, str, int, int]]:
    """Regular files under root as (relative path, absolute path, size, mtime_ns).

    Symlinks are not followed (a link in someone's repository may point at ~/.ssh), and VCS folders are
    skipped. One scandir per folder and one lstat per file: the listing must not cost more than reading.
    Links and special files (FIFOs, sockets, devices) are appended to `skipped` as (relative path, reason
    code, detail), so the scan can say why they are not in the dataset; so are folders that cannot be
    listed and files that cannot be looked at (no permission). A root that cannot be listed is a SourceError.
    """
    stack = [("", str(root))]
    while stack:
        rel, folder = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError as e:
            if not rel:
                raise SourceError(f"cannot list {root}: {e.strerror or e}") from None
            _record_unreadable(skipped, rel.rstrip("/"), "cannot list", e)
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in VCS_DIRS:
                            stack.append((rel + entry.name + "/", entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        yield rel + entry.name, entry.path, st.st_size, st.st_mtime_ns
                    elif skipped is not None:
                        mode = entry.stat(follow_symlinks=False).st_mode
                        skipped.append((rel + entry.name, *_not_a_file(entry.path, mode)))
                except OSError as e:
                    _record_unreadable(skipped, rel + entry.name, "cannot read", e)


class SourceStore:
    """The sources of one project, on disk. Safe to create many times over the same folder."""

    def __init__(self, home: Home, project: str = DEFAULT_PROJECT, *,
                 max_archive_bytes: int = archives.DEFAULT_MAX_BYTES,
                 max_archive_files: int = archives.DEFAULT_MAX_FILES,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.home = home
        self.project = check_name(project, "project name")
        self.dir = home.sources_dir(project)
        self.max_archive_bytes = max_archive_bytes
        self.max_archive_files = max_archive_files
        self.max_member_bytes = max_member_bytes

    # --- reading ----------------------------------------------------------------------------------------

    def list(self) -> list[Source]:
        if not self.dir.is_dir():
            return []
        out = [self._load(d / "source.json") for d in self.dir.iterdir() if d.is_dir()]
        return sorted((s for s in out if s is not None), key=lambda s: (s.added_at, s.id))

    def get(self, source_id: str) -> Source:
        source = self._load(self.dir / check_name(source_id, "source id") / "source.json")
        if source is None:
            raise SourceError(f"no source {source_id!r} in project {self.project!r}")
        return source

    @staticmethod
    def _load(path: Path) -> Source | None:
        """The source a source.json describes; None without one (a folder being removed). A damaged one is an
        error naming it: skipping it would drop the user's source from every scan without a word."""
        if not path.is_file():
            return None
        fix = f"remove the folder {path.parent} and add the source again"
        try:
            data = read_json_object(path)
            return SourceStore._from_dict(data)
        except ValueError as e:
            raise SourceError(f"{e}: {fix}") from None
        except TypeError:
            missing = sorted(n for n, f in Source.__dataclass_fields__.items()
                             if f.default is MISSING and f.default_factory is MISSING and n not in data)
            raise SourceError(f"{path} is damaged: it lacks {', '.join(missing) or 'valid fields'}: {fix}") from None

    @staticmethod
    def _from_dict(data: dict) -> Source:
        known = Source.__dataclass_fields__
        return Source(**{k: v for k, v in data.items() if k in known})

    def files(self, source: Source, skipped: list | None = None) -> Iterator[tuple[str, str, int, int]]:
        """The source's files as (relative path, absolute path, size, mtime_ns). What is not a regular file
        (links, FIFOs, devices; for an archive, the members not extracted) is appended to `skipped` as
        (relative path, reason code, detail)."""
        root = Path(source.root)
        if not root.is_dir():
            raise SourceError(f"{source.name}: folder {root} does not exist any more")
        if source.kind == "folder":
            unlisted: list = []
            listed = gitsource.tracked_and_untracked(root, unlisted)
            if listed is not None:
                if skipped is not None:
                    skipped.extend((rel, LINGUIST_ERROR, f"cannot list: {why}") for rel, why in unlisted)
                # A work tree: what git sees, so .gitignore'd build outputs and virtualenvs stay out.
                for rel in listed:
                    path = root / rel
                    try:
                        st = path.lstat()
                    except OSError as e:  # deleted but still in the index (not recorded), or not ours to read
                        _record_unreadable(skipped, rel, "cannot read", e)
                        continue
                    if stat.S_ISREG(st.st_mode):
                        yield rel, str(path), st.st_size, st.st_mtime_ns
                    elif skipped is not None and not stat.S_ISDIR(st.st_mode):  # a submodule is a folder
                        skipped.append((rel, *_not_a_file(str(path), st.st_mode)))
                return
        if skipped is not None:
            skipped.extend(tuple(item) for item in source.skipped)
        yield from walk_files(root, skipped)

    def find(self, spec: str, branch: str | None = None) -> Source | None:
        """The existing source added from the same URL or path (and branch), if any."""
        origin = self._origin_of(spec)
        for s in self.list():
            if s.origin == origin and (branch is None or s.branch == branch):
                return s
        return None

    def _refuse_duplicate(self, origin: str, branch: str | None = None, sha256: str | None = None) -> None:
        """Adding the same repository (and branch), folder, file or archive twice is an error that names the
        existing source: two copies would only be rejected as duplicates of each other."""
        for s in self.list():
            same = (s.origin == origin and (s.kind != "git" or s.branch == branch)) or \
                   (sha256 is not None and s.archive_sha256 == sha256)
            if same:
                raise SourceError(f"{origin} is already a source of this project ({s.label}, id {s.id}); "
                                  "update or remove that one instead")

    def _refuse_state_path(self, path: Path) -> Path:
        """A path inside the state directory (settings.json with its credentials, another source's clone) is
        never a source: it would copy secrets into a dataset or scan the workbench's own files."""
        resolved = path.resolve()
        if self.home.contains(resolved):
            raise SourceError(f"{path}: inside the state directory {self.home.root}, which cannot be a source")
        if resolved in self.home.root.parents:
            raise SourceError(f"{path}: holds the state directory {self.home.root}, which cannot be a source")
        return resolved

    @staticmethod
    def _origin_of(spec: str) -> str:
        path = Path(spec).expanduser()
        if path.exists() and not gitsource.is_git_dir(path):
            return str(path.resolve())
        try:
            return gitsource.parse_url(spec).url
        except gitsource.GitSourceError:
            return spec

    # --- adding -----------------------------------------------------------------------------------------

    def add(self, spec: str, *, test: bool = False, branch: str | None = None, shallow: bool = False,
            token: str | None = None) -> Source:
        """Add whatever `spec` is: an existing folder, archive or file, else a git URL. A folder that is a
        repository's git directory (a bare repository) is a git source, like its file:// URL."""
        spec = (spec or "").strip()
        if not spec:
            raise SourceError("empty source")
        path = Path(spec).expanduser()
        if path.is_dir():
            if gitsource.is_git_dir(path):   # a bare repository: the code is in its commits, not in its files
                self._refuse_state_path(path)
                return self.add_git(spec, branch=branch, shallow=shallow, token=token, test=test)
            return self.add_folder(path, test=test)
        if path.is_file():
            if archives.is_archive(path.name):
                return self.add_archive(path, test=test)
            return self.add_file(path, test=test)
        if "://" in spec or "::" in spec or gitsource._SCP_LIKE.match(spec):
            return self.add_git(spec, branch=branch, shallow=shallow, token=token, test=test)
        raise SourceError(f"{spec}: no such file or folder, and not a git URL")

    def ensure(self, spec: str, *, test: bool | None = None, token: str | None = None) -> Source:
        """The source for `spec`, added if new, refreshed if known (git fetch, archive re-extract)."""
        existing = self.find(spec)
        if existing is None:
            return self.add(spec, test=bool(test), token=token)
        self.refresh(existing.id)
        if test is not None and existing.test != test:
            self.set_test(existing.id, test)
        return self.get(existing.id)

    def _new_dir(self, kind: str, hint: str) -> tuple[str, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            sid = check_name(f"{kind}-{_slug(hint)}-{secrets.token_hex(3)}", "source id")
            d = self.dir / sid
            try:
                d.mkdir()
                return sid, d
            except FileExistsError:
                continue
        raise SourceError("cannot allocate a source folder")

    def _save(self, source: Source) -> Source:
        atomic_write_json(self.dir / source.id / "source.json", asdict(source))
        return source

    @contextlib.contextmanager
    def _building(self, kind: str, hint: str) -> Iterator[tuple[str, Path]]:
        """A fresh source folder that is removed again if anything inside the with-block fails."""
        sid, d = self._new_dir(kind, hint)
        try:
            yield sid, d
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def add_git(self, url: str, *, branch: str | None = None, shallow: bool = False, token: str | None = None,
                test: bool = False) -> Source:
        try:
            parsed = gitsource.parse_url(url)
        except gitsource.GitSourceError as e:
            raise SourceError(str(e)) from None
        token = token or parsed.token
        branch = (branch or "").strip() or None
        self._refuse_duplicate(parsed.url, branch)
        with self._building("git", parsed.url) as (sid, folder):
            env = self._git_env(parsed.transport, token)
            try:
                commit = gitsource.clone(parsed, folder / "repo", branch=branch, shallow=shallow, env=env)
            except gitsource.GitSourceError as e:
                raise SourceError(str(e)) from None
            auth = None
            if token and parsed.transport == "https":
                atomic_write_json(folder / "secret.json", {"token": token}, mode=0o600)
                auth = "token"
            elif parsed.transport == "ssh" and sshkeys.public_key(self.home):
                auth = "ssh-key"
            return self._save(Source(
                id=sid, kind="git", origin=parsed.url, name=_slug(parsed.url), root=str(folder / "repo"),
                test=test, branch=branch, shallow=shallow, auth=auth, commit=commit, added_at=_now()))

    def _git_env(self, transport: str, token: str | None) -> dict:
        key = sshkeys.private_key_path(self.home)
        if transport == "ssh":
            # ssh remembers new host keys in this folder (accept-new); it must exist even without a deploy key.
            sshkeys.ssh_dir(self.home).mkdir(mode=0o700, parents=True, exist_ok=True)
        return gitsource.git_env(transport, token=token, ssh_key=key if key.is_file() else None,
                                 known_hosts=sshkeys.known_hosts_path(self.home))

    def add_archive(self, path: str | os.PathLike, *, test: bool = False) -> Source:
        path = Path(path).expanduser()
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        origin = str(self._refuse_state_path(path))
        self._refuse_duplicate(origin)
        with self._building("archive", path.name) as (sid, folder):
            skipped = self._extract(path, folder / "files")
            return self._save(Source(
                id=sid, kind="archive", origin=origin, name=path.name, root=str(folder / "files"),
                test=test, archive_sha256=_file_sha256(path), added_at=_now(), skipped=skipped,
                member_limit=self.max_member_bytes))

    def add_archive_bytes(self, name: str, data: bytes, *, test: bool = False) -> Source:
        """An archive uploaded through the browser: kept beside its extraction so it can be re-extracted."""
        name = _safe_upload_name(name)
        if not archives.is_archive(name):
            raise SourceError(f"{name}: not a supported archive ({', '.join(archives.ARCHIVE_SUFFIXES)})")
        sha = hashlib.sha256(data).hexdigest()
        self._refuse_duplicate(f"upload:{name}", sha256=sha)
        with self._building("archive", name) as (sid, folder):
            kept = folder / name
            atomic_write_bytes(kept, data)
            skipped = self._extract(kept, folder / "files")
            return self._save(Source(
                id=sid, kind="archive", origin=f"upload:{name}", name=name, root=str(folder / "files"),
                test=test, archive_sha256=sha, added_at=_now(), skipped=skipped, member_limit=self.max_member_bytes))

    def _extract(self, archive: Path, dest: Path, keep: frozenset = frozenset()) -> list[list[str]]:
        """Extract; return the members not extracted as [path, reason code, detail]. Members in `keep` are
        extracted whatever their size (the whole-archive caps still hold)."""
        try:
            report = archives.extract(archive, dest, max_bytes=self.max_archive_bytes,
                                      max_files=self.max_archive_files, max_member_bytes=self.max_member_bytes,
                                      keep=keep)
        except archives.ArchiveError as e:
            raise SourceError(str(e)) from None
        return [list(item) for item in report.skipped]

    def _replace_files(self, source: Source, archive: Path, keep: frozenset = frozenset()) -> None:
        """Extract the archive again beside the old files, then swap the folders: a failure leaves the old ones."""
        d = self.dir / source.id
        fresh = d / f"files.new-{secrets.token_hex(3)}"
        source.skipped = self._extract(archive, fresh, keep)
        source.member_limit = self.max_member_bytes
        old = d / f"files.old-{secrets.token_hex(3)}"
        os.rename(source.root, old)
        os.rename(fresh, source.root)
        shutil.rmtree(old, ignore_errors=True)

    def _archive_file(self, source: Source) -> Path:
        """Where an archive source's archive is: the path it was added from, or the upload kept beside it."""
        if source.origin.startswith("upload:"):
            return self.dir / source.id / source.name
        return Path(source.origin)

    def extract_left_out(self, source: Source, keep: frozenset = frozenset()) -> Source:
        """An archive source with the members an earlier extraction left out as too large now on disk, when
        this store's limit is higher than the one it was extracted under or the member is in `keep` (the
        user force-included it). Unchanged when nothing was left out that now fits, or when the archive is
        gone or has changed (refresh's business, not the scan's)."""
        limit = source.member_limit
        wanted = [rel for rel, reason, _ in source.skipped if reason == archives.TOO_LARGE
                  and (rel in keep or (limit is not None and limit < self.max_member_bytes))]
        path = self._archive_file(source)
        if not wanted or not path.is_file() or _file_sha256(path) != source.archive_sha256:
            return source
        self._replace_files(source, path, keep)
        return self._save(source)

    def add_files(self, files: list[tuple[str, bytes]], *, test: bool = False) -> Source:
        """Uploaded single files (name, content): one source holding them all."""
        if not files:
            raise SourceError("no files to add")
        names = [_safe_upload_name(n) for n, _ in files]
        if len(set(names)) != len(names):
            raise SourceError("two uploaded files have the same name")
        with self._building("upload", names[0]) as (sid, folder):
            root = folder / "files"
            for name, (_, data) in zip(names, files):
                atomic_write_bytes(root / name, bytes(data))
            label = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
            return self._save(Source(
                id=sid, kind="upload", origin="upload:" + ",".join(names), name=label, root=str(root),
                test=test, files=names, added_at=_now()))

    def add_file(self, path: str | os.PathLike, *, test: bool = False) -> Source:
        """A single local file, copied in (so later edits of the original do not change the dataset)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        origin = str(self._refuse_state_path(path))
        self._refuse_duplicate(origin)
        with self._building("file", path.name) as (sid, folder):
            root = folder / "files"
            root.mkdir()
            shutil.copyfile(path, root / path.name)
            return self._save(Source(
                id=sid, kind="file", origin=origin, name=path.name, root=str(root), test=test,
                files=[path.name], added_at=_now()))

    def add_folder(self, path: str | os.PathLike, *, test: bool = False) -> Source:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise SourceError(f"{path}: no such folder")
        resolved = self._refuse_state_path(path)
        if gitsource.is_git_dir(path):   # a bare repository: the code is in its commits, not in its files
            return self.add_git(str(path), test=test)
        self._refuse_duplicate(str(resolved))
        with self._building("folder", resolved.name or "root") as (sid, folder):
            return self._save(Source(
                id=sid, kind="folder", origin=str(resolved), name=resolved.name or str(resolved),
                root=str(resolved), test=test, added_at=_now()))

    # --- changing ---------------------------------------------------------------------------------------

    def set_test(self, source_id: str, test: bool) -> Source:
        source = self.get(source_id)
        source.test = bool(test)
        return self._save(source)

    def remove(self, source_id: str) -> None:
        """Forget a source. For a local folder only our record goes; the user's folder is never touched."""
        d = self.dir / check_name(source_id, "source id")
        if not (d / "source.json").is_file():
            raise SourceError(f"no source {source_id!r} in project {self.project!r}")
        # Unlink source.json first: a crash midway leaves a folder that list() ignores.
        (d / "source.json").unlink()
        shutil.rmtree(d, ignore_errors=True)

    def refresh(self, source_id: str) -> Source:
        """Bring a source up to date: git fetches new commits; an archive from a path is re-extracted if it
        changed; folders are read live and uploads never change."""
        source = self.get(source_id)
        if source.kind == "git":
            return self.update(source_id)
        if source.kind == "archive" and not source.origin.startswith("upload:"):
            path = Path(source.origin)
            if not path.is_file():
                raise SourceError(f"{source.name}: archive {path} does not exist any more")
            sha = _file_sha256(path)
            if sha != source.archive_sha256:
                self._replace_files(source, path)
                source.archive_sha256 = sha
                source.updated_at = _now()
                source.last_update = {"changed": "archive re-extracted"}
                return self._save(source)
        return source

    def update(self, source_id: str) -> Source:
        """git fetch + reset to the branch's newest commit; records which files changed."""
        source = self.get(source_id)
        if source.kind != "git":
            raise SourceError(f"{source.name} is a {source.kind} source; only git sources fetch updates")
        secret = read_json(self.dir / source.id / "secret.json", {}) or {}
        transport = gitsource.parse_url(source.origin).transport
        env = self._git_env(transport, secret.get("token"))
        try:
            old, new, changed = gitsource.fetch_and_reset(Path(source.root), branch=source.branch,
                                                          shallow=source.shallow, env=env)
        except gitsource.GitSourceError as e:
            raise SourceError(f"{source.name}: {e}") from None
        source.commit = new
        source.updated_at = _now()
        source.last_update = {"from": old, "to": new, "changed": len(changed), "paths": changed[:1000]}
        return self._save(source)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
