"""`ProjectService`: what the Sources and Scan panels, a notebook or a script do with one project.

A thin facade over `SourceStore`, `ScanJob`, the scan results and the per-file overrides, plus a tiny
observer list so that two panels sharing one service see each other's changes (a source added in Sources
shows up in Scan). Observers are called with an event name; they must not assume which thread calls them.
The service never imports ipywidgets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from refact_lab.config import ScanSettings
from refact_lab.data import archives, pipeline, sshkeys
from refact_lab.data.jobs import ScanJob, read_status
from refact_lab.data.sources import Source, SourceStore
from refact_lab.home import DEFAULT_PROJECT, Home

EVENTS = ("sources", "scan-started", "scan-finished", "overrides")


@dataclass
class ScanResults:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    stats: dict | None = None

    @property
    def all(self) -> list[dict]:
        return self.accepted + self.rejected


class ProjectService:
    def __init__(self, home: Home, project: str = DEFAULT_PROJECT):
        self.home = home
        self.project = project
        self.sources = SourceStore(home, project)
        self.job = ScanJob(home, project, on_finish=lambda status: self._notify("scan-finished"))
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    # --- observers ------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, event: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one broken view must not stop the others
                import traceback

                traceback.print_exc()

    # --- sources --------------------------------------------------------------------------------------

    def list_sources(self) -> list[Source]:
        return self.sources.list()

    def _added(self, source: Source) -> Source:
        self._notify("sources")
        return source

    def add(self, spec: str, **kwargs) -> Source:
        return self._added(self.sources.add(spec, **kwargs))

    def add_git(self, url: str, *, branch: str | None = None, shallow: bool = False, token: str | None = None,
                test: bool = False) -> Source:
        return self._added(self.sources.add_git(url, branch=branch, shallow=shallow, token=token or None,
                                                test=test))

    def add_folder(self, path: str, *, test: bool = False) -> Source:
        return self._added(self.sources.add_folder(path, test=test))

    def add_archive(self, path: str, *, test: bool = False) -> Source:
        return self._added(self.sources.add_archive(path, test=test))

    def add_uploads(self, files: list[tuple[str, bytes]], *, test: bool = False) -> list[Source]:
        """Uploaded files: each archive becomes its own source (extracted); the other files one source."""
        added = []
        plain = [(n, d) for n, d in files if not archives.is_archive(n)]
        try:
            for name, data in files:
                if archives.is_archive(name):
                    added.append(self.sources.add_archive_bytes(name, data, test=test))
            if plain:
                added.append(self.sources.add_files(plain, test=test))
        finally:
            if added:  # what was added before a failing file stays added, and the views must know
                self._notify("sources")
        return added

    def remove_source(self, source_id: str) -> None:
        self.sources.remove(source_id)
        self._notify("sources")

    def set_source_test(self, source_id: str, test: bool) -> Source:
        source = self.sources.set_test(source_id, test)
        self._notify("sources")
        return source

    def update_source(self, source_id: str) -> Source:
        """Fetch a git source's new commits (or re-extract a changed archive). Re-scan to see the effect:
        unchanged files are not read again."""
        source = self.sources.refresh(source_id)
        self._notify("sources")
        return source

    # --- scanning -------------------------------------------------------------------------------------

    def last_settings(self) -> ScanSettings:
        return pipeline.settings_from_stats(pipeline.load_results(self.home, self.project)[2])

    def start_scan(self, settings: ScanSettings | None = None) -> ScanJob:
        self.job.start(settings or self.last_settings())
        self._notify("scan-started")
        return self.job

    def run_scan(self, settings: ScanSettings | None = None, progress=None) -> dict:
        """Scan in this thread and return the stats (for scripts and notebooks that want to wait)."""
        try:
            return self.job.run(settings or self.last_settings(), progress=progress)
        finally:
            self._notify("scan-finished")

    def stop_scan(self) -> None:
        self.job.stop()

    def wait_scan(self, timeout: float | None = None) -> dict:
        return self.job.wait(timeout)

    def scan_status(self) -> dict:
        return read_status(self.home, self.project)

    @property
    def scanning(self) -> bool:
        return self.job.running or self.scan_status().get("state") in ("queued", "running")

    def results(self) -> ScanResults:
        accepted, rejected, stats = pipeline.load_results(self.home, self.project)
        return ScanResults(accepted, rejected, stats)

    # --- per-file overrides ---------------------------------------------------------------------------

    def overrides(self) -> dict[str, list[str]]:
        return pipeline.load_overrides(self.home, self.project)

    def _override(self, key: str, **change) -> dict:
        out = pipeline.set_override(self.home, self.project, key, **change)
        self._notify("overrides")
        return out

    def force_include(self, key: str) -> dict:
        return self._override(key, include=True)

    def force_exclude(self, key: str) -> dict:
        return self._override(key, exclude=True)

    def clear_override(self, key: str) -> dict:
        return self._override(key, include=False, exclude=False)

    def mark_file_test(self, key: str, test: bool = True) -> dict:
        return self._override(key, test=test)

    # --- credentials ----------------------------------------------------------------------------------

    def deploy_key(self) -> str | None:
        return sshkeys.public_key(self.home)

    def generate_deploy_key(self, overwrite: bool = False) -> str:
        return sshkeys.generate_deploy_key(self.home, overwrite=overwrite)
