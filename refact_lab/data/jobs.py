"""A scan as a job: it runs in a background thread and keeps its state in `scan/status.json`.

State, stage, progress and error live on disk so any observer — the Scan panel's poller, another kernel,
the CLI, a reloaded browser page — sees the same thing (STYLE.md point 6). Cancellation is cooperative: `stop()`
sets an event and drops a `stop` file (for a scan started by another process); the pipeline checks between
steps and then writes nothing. A status left "queued" or "running" by a process that died (checked by pid and
the process's start time, so a recycled pid does not keep it alive) reads as failed.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
import traceback
from typing import Callable

from refact_lab.config import ScanSettings
from refact_lab.data.pipeline import ScanCancelled, run_scan, scan_files
from refact_lab.home import DEFAULT_PROJECT, Home, atomic_write_json, read_json
from refact_lab.job_status import orphaned, owner_fields, status_problem

STAGE_LABELS = {
    "listing": "Listing files", "rules": "Applying rules", "reading": "Reading files",
    "near-duplicates": "Finding near-duplicates", "secrets": "Looking for secrets",
    "loss": "Computing per-file loss", "writing": "Writing results",
    "done": "Done",
}
_WRITE_EVERY_S = 0.2


def _now() -> str:
    # Milliseconds: a panel tells two scans finished in the same second apart.
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_status(home: Home, project: str = DEFAULT_PROJECT) -> dict:
    """The job's last written status; "idle" before any scan; "failed" if its process has died, or when the
    file is damaged (saying so: the next scan writes a fresh one), so the app and CLI never raise on it."""
    path = scan_files(home, project)["status"]
    try:
        status = read_json(path, None)
        if status is None or status == {}:
            status = {"state": "idle"}
        problem = status_problem(status)   # its times are ISO text
        if problem:
            raise ValueError(f"{path} is damaged: {problem}")
    except ValueError as e:
        return {"state": "failed", "error": f"{e}; the next scan replaces it"}
    if orphaned(status):
        status = {**status, "state": "failed", "error": "the process running the scan ended unexpectedly"}
    return status


class ScanJob:
    """Start, observe and stop the scan of one project. One job object per project and kernel is enough."""

    def __init__(self, home: Home, project: str = DEFAULT_PROJECT,
                 on_finish: Callable[[dict], None] | None = None):
        """`on_finish(status)` is called from the job's thread with the final status, whatever the outcome."""
        self.home = home
        self.project = project
        self.paths = scan_files(home, project)
        self.on_finish = on_finish
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._status: dict = {}
        self._last_write = 0.0
        self._unsaved = False
        self.stats: dict | None = None

    # --- observing ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        if self._unsaved and self._status:
            return dict(self._status)
        return read_status(self.home, self.project)

    def wait(self, timeout: float | None = None) -> dict:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    # --- controlling ----------------------------------------------------------------------------------

    def start(self, settings: ScanSettings | None = None) -> "ScanJob":
        """Run the scan in a background thread and return at once."""
        # Another process scanning the same project is caught by the pipeline's lock, with a clear error.
        if self.running:
            raise RuntimeError("a scan of this project is already running")
        self._begin()
        self._thread = threading.Thread(target=self._main, args=(settings or ScanSettings(), None, False),
                                        name=f"scan-{self.project}", daemon=True)
        self._thread.start()
        return self

    def run(self, settings: ScanSettings | None = None, progress: Callable[[str, int, int], None] | None = None
            ) -> dict:
        """Run the scan in this thread (the CLI), writing the same status; re-raise what made it fail."""
        self._begin()
        return self._main(settings or ScanSettings(), progress, True)

    def stop(self) -> None:
        self._stop.set()
        self.paths["dir"].mkdir(parents=True, exist_ok=True)
        self.paths["stop"].touch()

    # --- internals ------------------------------------------------------------------------------------

    def _begin(self) -> None:
        self._stop.clear()
        self.paths["stop"].unlink(missing_ok=True)
        self.stats = None
        self._status = {"state": "queued", "stage": "listing", "done": 0, "total": 0,
                        "message": "Queued", "error": None, **owner_fields(), "started_at": _now(),
                        "finished_at": None, "summary": None}
        self._write(force=True)

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self.paths["stop"].exists()

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= _WRITE_EVERY_S:
            self._last_write = now
            self._status["updated_at"] = _now()
            try:
                atomic_write_json(self.paths["status"], self._status)
                self._unsaved = False
            except OSError:
                # A full disk must not turn the scan's own outcome into a traceback: this job object still
                # reports the status it could not save (see status()), and the caller gets the scan's error.
                self._unsaved = True

    def _progress(self, stage: str, done: int, total: int) -> None:
        changed = stage != self._status.get("stage")
        label = STAGE_LABELS.get(stage, stage)
        self._status.update(state="running", stage=stage, done=done, total=total,
                            message=f"{label}: {done}/{total}" if total else f"{label}: {done}")
        self._write(force=changed)

    def _main(self, settings: ScanSettings, progress, reraise: bool):
        try:
            return self._scan(settings, progress, reraise)
        finally:
            self.paths["stop"].unlink(missing_ok=True)
            if self.on_finish:
                try:
                    self.on_finish(dict(self._status))
                except Exception:  # an observer's bug must not change the job's outcome
                    traceback.print_exc()

    def _scan(self, settings: ScanSettings, progress, reraise: bool):
        def report(stage: str, done: int, total: int) -> None:
            self._progress(stage, done, total)
            if progress:
                progress(stage, done, total)

        try:
            self._status.update(state="running", message="Starting")
            self._write(force=True)
            stats = run_scan(self.home, self.project, settings, progress=report, should_stop=self._should_stop)
        except (ScanCancelled, KeyboardInterrupt):  # the Stop button, or Ctrl-C in a terminal: both are a stop
            self._status.update(state="stopped", message="Stopped; the previous results are unchanged",
                                finished_at=_now())
            self._write(force=True)
            if reraise:
                raise
            return None
        except BaseException as e:  # the job must always leave a final state on disk
            self._status.update(state="failed", error=str(e) or type(e).__name__, message="Failed",
                                finished_at=_now(), traceback=traceback.format_exc()[-4000:])
            self._write(force=True)
            if reraise:
                raise
            return None
        self.stats = stats
        summary = {k: stats[k] for k in ("files", "accepted", "rejected", "reasons", "train", "test", "split_error")}
        self._status.update(state="finished", stage="done", done=stats["files"], total=stats["files"],
                            message=f"Done: {stats['accepted']} accepted, {stats['rejected']} rejected",
                            finished_at=_now(), summary=summary)
        self._write(force=True)
        return stats
