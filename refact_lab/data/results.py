"""A scan's published results, and the one place that reads them: fine-tuning, the Scan panel and the CLI
import these readers instead of parsing the files themselves.

A scan's outputs are one set: `accepted.jsonl`, `rejected.jsonl` and `stats.json` written into a new folder
`projects/<p>/scan/results/<id>/`, then published by one atomic switch of the symlink `scan/current` (a new
link renamed over the old one). A reader resolves `current` once and reads all three files from that folder,
so it never sees the accepted list of one scan with the stats of another, and a scan that fails midway (a
full disk, a kill) leaves the previous set current and whole. The previous set is kept one scan longer for
readers that resolved it just before a switch.

`scan/accepted.jsonl` (and the other two names) are relative links through `current`, for people and tools
that open the files by hand. A state directory from before sets (real files directly in `scan/`) is still
read, until its first new scan.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from refact_lab.home import DEFAULT_PROJECT, Home, read_json, read_jsonl

ACCEPTED = "accepted.jsonl"
REJECTED = "rejected.jsonl"
STATS = "stats.json"
SET_FILES = (ACCEPTED, REJECTED, STATS)
SETS = "results"      # scan/results/<id>/: one folder per published scan
CURRENT = "current"   # scan/current -> results/<id>


class ScanRecord(TypedDict, total=False):
    """One line of accepted.jsonl or rejected.jsonl."""

    source: str            # the source's id (folder name under sources/; overrides are keyed "source/path")
    source_name: str       # the source's human name, for lists and details
    path: str              # relative to the source's root, '/'-separated
    file: str              # where the scan read it
    size: int
    sha256: str | None
    language: str | None
    set: str               # "train" or "test"
    loss: float | None
    forced: bool           # accepted: force-included by the user
    overridden: dict       # accepted: {"reason", "detail"} the force-include overrode
    reason: str            # rejected: the reason code (filters.REASONS)
    detail: str            # rejected: the human detail


@dataclass
class ScanResults:
    """One consistent set: what the last finished scan accepted and rejected, and its stats."""

    accepted: list[ScanRecord] = field(default_factory=list)
    rejected: list[ScanRecord] = field(default_factory=list)
    stats: dict | None = None
    folder: Path | None = None     # where they were read from; None before the first scan

    @property
    def all(self) -> list[ScanRecord]:
        return self.accepted + self.rejected


def current_dir(home: Home, project: str = DEFAULT_PROJECT) -> Path | None:
    """The folder of the published set (resolved once, so reads from it are consistent); None before the
    first scan."""
    scan = home.scan_dir(project)
    try:
        target = os.readlink(scan / CURRENT)
    except OSError:
        target = None
    if target is not None:
        folder = scan / target
        return folder if folder.is_dir() else None
    # before sets: the files lay directly in scan/ (also what a test or a tool may write by hand)
    legacy = [scan / name for name in SET_FILES]
    if any(p.is_file() and not p.is_symlink() for p in legacy):
        return scan
    return None


def accepted_file(home: Home, project: str = DEFAULT_PROJECT) -> Path:
    """The accepted list of the published set (a path that does not exist before the first scan)."""
    folder = current_dir(home, project)
    return (folder or home.scan_dir(project)) / ACCEPTED


def has_results(home: Home, project: str = DEFAULT_PROJECT) -> bool:
    return accepted_file(home, project).is_file()


def read_accepted(home: Home, project: str = DEFAULT_PROJECT) -> list[ScanRecord]:
    folder = current_dir(home, project)
    return read_jsonl(folder / ACCEPTED) if folder else []


def read_rejected(home: Home, project: str = DEFAULT_PROJECT) -> list[ScanRecord]:
    folder = current_dir(home, project)
    return read_jsonl(folder / REJECTED) if folder else []


def read_stats(home: Home, project: str = DEFAULT_PROJECT) -> dict | None:
    folder = current_dir(home, project)
    return _stats(folder / STATS) if folder else None


def _stats(path) -> dict | None:
    """A published stats.json (None: missing); ValueError naming it when it is not an object (a hand edit, a
    damaged disk)."""
    stats = read_json(path)
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"{path} is damaged: expected the scan's stats object")
    return stats


def _records(path) -> list:
    """The records of a published list, for the app; a line that is not an object is not a record (as read_jsonl
    skips a line that is not JSON). Training reads the lines itself and logs the ones it skips."""
    return [r for r in read_jsonl(path) if isinstance(r, dict)]


def read_results(home: Home, project: str = DEFAULT_PROJECT) -> ScanResults:
    """All three files of one set, read from the same folder."""
    folder = current_dir(home, project)
    if folder is None:
        return ScanResults()
    return ScanResults(_records(folder / ACCEPTED), _records(folder / REJECTED), _stats(folder / STATS), folder)


# --- publishing ---------------------------------------------------------------------------------------

def _write_file(path: Path, text: str) -> None:
    """One file of a new set; fsync'd, since the switch that follows promises the set is whole."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _link(scan: Path, name: str, target: str) -> None:
    """Make `scan/name` a symlink to `target`, atomically (a new link renamed over whatever was there)."""
    tmp = scan / f".{name}.{secrets.token_hex(4)}.link"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, scan / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish(home: Home, project: str, files: dict[str, str]) -> Path:
    """Write `files` (name -> text; stats.json among them) as a new set and make it current in one switch.
    On any error (OSError: a full disk) the new folder is removed and the previous set stays current."""
    scan = home.scan_dir(project)
    sets = scan / SETS
    sets.mkdir(parents=True, exist_ok=True)
    set_id = f"{_dt_id()}-{secrets.token_hex(3)}"
    tmp = sets / f".{set_id}.tmp"
    folder = sets / set_id
    try:
        tmp.mkdir()
        # stats last: the set's summary is written once its lists are whole
        for name in sorted(files, key=lambda n: n == STATS):
            _write_file(tmp / name, files[name])
        os.rename(tmp, folder)
        previous = current_dir(home, project)
        _link(scan, CURRENT, f"{SETS}/{set_id}")   # the switch: from here on readers see the new set
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.is_dir() and current_dir(home, project) != folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # After the switch nothing may undo it; tidying up is best effort.
    with contextlib.suppress(OSError):
        for name in SET_FILES:   # scan/accepted.jsonl -> current/accepted.jsonl, replacing files of before sets
            p = scan / name
            if not (p.is_symlink() and os.readlink(p) == f"{CURRENT}/{name}"):
                _link(scan, name, f"{CURRENT}/{name}")
        keep = {set_id, previous.name if previous is not None and previous.parent == sets else None}
        for old in sets.iterdir():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def _dt_id() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
