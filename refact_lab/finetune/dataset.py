"""The scanned dataset as training needs it: the text of every accepted file, split into train and test.

The scan (refact_lab.data) writes `projects/<project>/scan/accepted.jsonl`, one record per accepted file with
at least `path`, `source`, `sha256`, `size`, `language` and `set` ("train" or "test"), and `file`, where it
read the file: a clone or unpacked archive under `projects/<project>/sources/<source>/`, or a local folder
left where it is (its root is in the source's source.json). This module is the one place that turns those
records into texts; the records themselves are read through `refact_lab.data.results`, which owns the
scan's layout, and a file's bytes are decoded by `refact_lab.data.filters.decode_text`, as the scan decoded
them (a UTF-16 file by its byte-order mark, the mark dropped).

A file that has disappeared or changed since the scan (its sha256 differs) is skipped and counted, not fatal:
the run's log says how many. With no test files at all, a deterministic tenth of the training files (chosen
by content hash, so the choice survives re-scans) is held out, because a run without test loss cannot pick
its best checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from refact_lab.data.filters import decode_text
from refact_lab.home import Home, read_json

HOLDOUT_SHARE = 0.1


@dataclass(frozen=True)
class DatasetFile:
    key: str          # "<source>/<path>": stable and unique inside a project
    text: str
    set: str          # "train" or "test"
    language: str = ""


@dataclass
class Dataset:
    project: str
    train: list[DatasetFile] = field(default_factory=list)
    test: list[DatasetFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # "<key>: why"
    notes: list[str] = field(default_factory=list)

    def pairs(self, which: str) -> list[tuple[str, str]]:
        return [(f.key, f.text) for f in getattr(self, which)]

    def summary(self) -> str:
        chars = sum(len(f.text) for f in self.train)
        text = (f"{self.project}: {len(self.train)} train files ({chars:,} characters), "
                f"{len(self.test)} test files")
        if self.skipped:
            text += f"; {len(self.skipped)} skipped (missing or changed since the scan)"
        return text


def accepted_path(home: Home, project: str) -> Path:
    from refact_lab.data.results import accepted_file  # the data package owns the scan's layout

    return accepted_file(home, project)


def available_projects(home: Home) -> list[str]:
    """Projects that have a scanned dataset (an accepted.jsonl)."""
    return [p for p in home.projects() if accepted_path(home, p).is_file()]


def _resolve_text(home: Home, project: str, record: dict) -> tuple[str | None, str]:
    """The text of one accepted file, or (None, why not)."""
    for key in ("text", "content"):
        if isinstance(record.get(key), str):
            return record[key], ""
    rel = str(record.get("path") or "")
    if not rel:
        return None, "record has no path"
    candidates = []
    if record.get("file"):             # the scan records where it read the file (a local folder stays put)
        candidates.append(Path(record["file"]))
    if Path(rel).is_absolute():
        candidates.append(Path(rel))
    else:
        source_dir = home.sources_dir(project) / str(record.get("source") or "")
        root = (read_json(source_dir / "source.json", {}) or {}).get("root") if source_dir.is_dir() else None
        if root:
            candidates.append(Path(root) / rel)
        candidates.append(source_dir / rel)
        # a source folder may keep its files one level down (a checkout, an unpacked archive)
        if source_dir.is_dir():
            candidates += [sub / rel for sub in sorted(source_dir.iterdir()) if sub.is_dir()]
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            expected = record.get("sha256")
            if expected and hashlib.sha256(data).hexdigest() != expected:
                return None, "changed since the scan (sha256 differs)"
            return decode_text(data, errors="replace"), ""   # as the scan read it: by byte-order mark
    return None, "file not found"


def load_dataset(home: Home, project: str) -> Dataset:
    """Read the project's accepted files. Raises FileNotFoundError / ValueError with a clear message."""
    path = accepted_path(home, project)
    if not path.is_file():
        raise FileNotFoundError(f"project {project!r} has no scanned dataset ({path} is missing): "
                                f"run a scan first (refact-lab scan SOURCE --project {project})")
    from refact_lab.data.results import read_accepted

    ds = Dataset(project)
    for record in read_accepted(home, project):
        if not isinstance(record, dict):   # a damaged or hand-edited line: skipped and counted like a lost file
            ds.skipped.append(f"{json.dumps(record)[:40]}: a record that is not a JSON object")
            continue
        key = f"{record.get('source', '')}/{record.get('path', '')}".lstrip("/")
        text, why = _resolve_text(home, project, record)
        if text is None:
            ds.skipped.append(f"{key}: {why}")
            continue
        if not text.strip():
            continue
        which = "test" if record.get("set") == "test" else "train"
        getattr(ds, which).append(DatasetFile(key, text, which, str(record.get("language") or "")))
    if not ds.train:
        raise ValueError(f"project {project!r} has no training files in {path}"
                         + (f" ({len(ds.skipped)} could not be read)" if ds.skipped else ""))
    if not ds.test:
        ranked = sorted(ds.train, key=lambda f: hashlib.sha256(f.text.encode()).hexdigest())
        n = max(1, round(HOLDOUT_SHARE * len(ranked))) if len(ranked) > 1 else 0
        held = {f.key for f in ranked[:n]}
        if held:
            ds.test = [DatasetFile(f.key, f.text, "test", f.language) for f in ds.train if f.key in held]
            ds.train = [f for f in ds.train if f.key not in held]
            ds.notes.append(f"no test files were marked: held out {len(held)} of the training files "
                            "(chosen by content hash) to measure test loss")
        else:
            # one file only: measure test loss on it too, better than no curve at all
            ds.test = [DatasetFile(f.key, f.text, "test", f.language) for f in ds.train]
            ds.notes.append("only one file: the test loss is measured on the training file itself")
    return ds
