"""`ProjectService`: what the Sources and Scan panels, a notebook or a script do with one project.

A thin facade over `SourceStore`, `ScanJob`, the scan results and the per-file overrides, plus a tiny
observer list so that two panels sharing one service see each other's changes (a source added in Sources
shows up in Scan). Observers are called with an event name; they must not assume which thread calls them.
The service never imports ipywidgets.
"""

from __future__ import annotations

import threading
from typing import Callable

from refact_lab.config import ScanSettings
from refact_lab.data import archives, pipeline, results as scan_results, sshkeys
from refact_lab.data.jobs import ScanJob, read_status
from refact_lab.data.results import ScanResults
from refact_lab.data.sources import Source, SourceStore
from refact_lab.home import DEFAULT_PROJECT, Home

EVENTS = ("sources", "scan-started", "scan-finished", "overrides")


__all__ = ["EVENTS", "ProjectService", "ScanResults"]


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
        """The last published scan: accepted and rejected records (each with `source`, the source's id, and
        `source_name`, its name) and the stats, read from one set."""
        return scan_results.read_results(self.home, self.project)

    def stale_reasons(self) -> list[str]:
        """Why the published results no longer describe the sources (empty: they do, or there are none):
        sources added, removed or changed (new commits, a re-extracted archive, a test mark) or per-file
        overrides changed since that scan. A local folder is read live, so its edits are not seen here."""
        stats = scan_results.read_stats(self.home, self.project)
        if not stats:
            return []
        seen = {s.get("id"): s for s in stats.get("sources") or []}
        now = {s.id: s for s in self.list_sources()}
        why = [f"source {now[i].name!r} was added" for i in now if i not in seen]
        why += [f"source {s.get('display_name') or s.get('name') or i!r} was removed" for i, s in seen.items()
                if i not in now]
        for i, source in now.items():
            old = seen.get(i)
            if old is None:
                continue
            state = pipeline.source_state(source)
            # stats from before "state" was recorded still compare on what they have
            before = old.get("state") or {"test": old.get("test"), "commit": old.get("commit")}
            if any(before.get(k, state[k]) != state[k] for k in state):
                why.append(f"source {source.name!r} changed ({self._what_changed(before, state)})")
        digest = stats.get("overrides_digest")
        if digest is not None and digest != pipeline.overrides_digest(self.overrides()):
            why.append("files were force-included, excluded or marked test")
        return why

    @staticmethod
    def _what_changed(before: dict, now: dict) -> str:
        labels = {"test": "test mark", "commit": "new commits", "archive_sha256": "archive changed",
                  "updated_at": "updated"}
        changed = [labels[k] for k in now if k in before and before[k] != now[k]]
        if "updated" in changed and len(changed) > 1:
            changed.remove("updated")
        return ", ".join(changed)

    def results_stale(self) -> bool:
        """True when the sources or overrides changed since the last published scan: show a "rescan" hint."""
        return bool(self.stale_reasons())

    def applied_loss_threshold(self) -> float | None:
        """The loss threshold the last scan applied (the model's own under "auto"); None without stage 2."""
        stats = scan_results.read_stats(self.home, self.project) or {}
        value = stats.get("loss_threshold")
        if value is None and stats.get("loss"):
            value = stats["loss"].get("threshold")
        return value

    def default_loss_threshold(self, model: str | None = None) -> float | None:
        """The threshold "auto" stands for before any scan applied one: the registry's for the model the scan
        would use (`model`, else the served one); None for a model the registry cannot resolve."""
        from refact_lab.models.registry import resolve
        from refact_lab.serve.state import active_model

        try:
            return resolve(model or active_model(self.home)).loss_threshold
        except ValueError:
            return None   # an unknown model: the scan itself will say so

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
