"""The state directory: where every project, scan, run and setting lives on disk.

Layout (see DESIGN.md)::

    settings.json                      server settings, active model and LoRA choice, credentials (0600)
    projects/<project>/sources/<id>/   cloned repos, unpacked archives, uploads; source.json
    projects/<project>/scan/           results/<id>/{accepted.jsonl, rejected.jsonl, stats.json} published as one
                                       set behind the `current` symlink (data/results.py); loss and facts caches,
                                       overrides.json, status.json
    runs/<run_id>/                     settings.json, status.json, metrics.jsonl, log.txt, checkpoints/

Every JSON file is written atomically (temp file in the same folder, fsync, rename) so a crash or a
concurrent reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ENV_VAR = "REFACT_LAB_HOME"
DEFAULT_PROJECT = "default"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_home_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".refact_lab").expanduser()


class HomeError(ValueError):
    """The state directory cannot be used: an empty path, a file, a device, or a folder we cannot create."""


def _check_home_root(root: Path) -> None:
    """Refuse a state directory that is not a folder (a file, /dev/null) or lies under a non-folder."""
    if root.exists() and not root.is_dir():
        raise HomeError(f"the state directory {root} is not a folder (it is a file or a device); "
                        "give a folder path to --home")
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise HomeError(f"the state directory {root} cannot be created: {parent} is not a folder")
            break


def check_name(name: str, what: str = "name") -> str:
    """Project, source and run names become folder names, so they must not contain path tricks."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj: Any, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", mode)


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; a missing file gives `default`. A damaged one (not JSON, not text, a folder in its
    place) raises ValueError naming it and what is wrong, never a bare decoding error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON: it is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (settings, a status): a missing file gives {}; a file holding
    anything else (`[]`, a string) raises ValueError naming it, since reading it as empty would silently
    drop what the user wrote."""
    data = read_json(path, {})
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged: expected a JSON object, found {_JSON_KINDS.get(type(data), 'JSON')}")
    return data


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; a single write() of a line under PIPE_BUF-ish size is atomic enough for readers
    that skip a trailing partial line (see read_jsonl). A line a crash cut off (the file does not end with a
    newline) is ended first: glued to it, this record would be skipped with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file, skipping a trailing line that a writer has not finished yet."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An advisory lock (flock) across processes: the server, a notebook kernel and a training run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- liveness of the process that owns a job (a scan, a training run) ----------------------------------

def proc_start_ticks(pid: int) -> int | None:
    """The process start time from /proc (guards against a recycled pid); None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether the process exists, is not a zombie, and (given its start time) is not a recycled pid."""
    if not pid:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        # reap it if it is our own finished child, so it does not linger as a zombie
        os.waitpid(pid, os.WNOHANG)
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            return False
        state = stat[stat.rindex(")") + 2:].split()[0]
        if state in ("Z", "X"):
            return False
        if start_ticks is not None and proc_start_ticks(pid) != start_ticks:
            return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Home:
    """Paths inside one state directory. Creating the object touches nothing; `ensure()` creates it."""

    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Home":
        """The state directory at `path` (None: $REFACT_LAB_HOME or ~/.refact_lab). A path that is given but
        empty, or that is (or lies under) something other than a folder, is a HomeError: falling back to the
        default would silently write somewhere the user did not ask for. Nothing is created here."""
        if path is None:
            root = default_home_path()
        else:
            if not str(path).strip():
                raise HomeError("the state directory (--home) is empty: give a folder path, or leave it out to "
                                f"use ${ENV_VAR} or ~/.refact_lab")
            root = Path(path).expanduser()
        root = root.resolve()
        _check_home_root(root)
        return cls(root)

    def ensure(self) -> "Home":
        _check_home_root(self.root)
        try:
            for d in (self.root, self.projects_dir, self.runs_dir):
                d.mkdir(parents=True, exist_ok=True)
            if not self.settings_file.exists():
                atomic_write_json(self.settings_file, {}, mode=0o600)
        except OSError as e:
            raise HomeError(f"cannot create the state directory {self.root}: {e.strerror or e}") from None
        return self

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether `path` (resolved, links followed) is the state directory or inside it."""
        resolved = Path(path).expanduser().resolve()
        return resolved == self.root or self.root in resolved.parents

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.json"

    @property
    def projects_dir(self) -> Path:
        return self.root / "projects"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def project_dir(self, project: str = DEFAULT_PROJECT) -> Path:
        return self.projects_dir / check_name(project, "project name")

    def sources_dir(self, project: str = DEFAULT_PROJECT) -> Path:
        return self.project_dir(project) / "sources"

    def scan_dir(self, project: str = DEFAULT_PROJECT) -> Path:
        return self.project_dir(project) / "scan"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / check_name(run_id, "run id")

    def projects(self) -> list[str]:
        if not self.projects_dir.is_dir():
            return []
        return sorted(p.name for p in self.projects_dir.iterdir() if p.is_dir())

    # settings.json holds credentials too, so it is always written 0600.
    def load_settings(self) -> dict:
        return read_json_object(self.settings_file)

    def update_settings(self, **changes: Any) -> dict:
        with file_lock(self.root / ".settings.lock"):
            settings = self.load_settings()
            for key, value in changes.items():
                if value is None:
                    settings.pop(key, None)
                else:
                    settings[key] = value
            atomic_write_json(self.settings_file, settings, mode=0o600)
            return settings
