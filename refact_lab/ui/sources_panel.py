"""The Sources panel: a view over `refact_lab.data.service.ProjectService`.

Add a git repository (URL or local path, branch, shallow, token), uploaded files (archives among them are
extracted), a folder on the server or an archive on the server; mark any source as test (held out); update a
git source (fetch new commits, then re-scan: only changed files are read again); remove a source.

Adding a repository can take a while, so every action runs in a worker thread and the panel shows "working"
meanwhile: the kernel keeps serving other widgets. No file I/O here: the service does it (STYLE.md point 7).
"""

from __future__ import annotations

import html
import threading
from typing import Callable

import ipywidgets as w

from refact_lab.ui.messages import MessageMixin


class SourcesPanel(MessageMixin):
    """`SourcesPanel(ProjectService(home)).widget` is the Sources tab."""

    def __init__(self, service, *, background: bool = True):
        self.service = service
        self.background = background
        self._worker: threading.Thread | None = None
        self.last_error: str | None = None
        wide, style = w.Layout(width="520px"), {"description_width": "110px"}

        # --- git
        self.git_url = w.Text(description="Repository", placeholder="https://…/repo.git, git@host:org/repo.git, "
                              "ssh://…, file://… or a local path", layout=wide, style=style)
        self.git_branch = w.Text(description="Branch", placeholder="default branch", layout=w.Layout(width="300px"),
                                 style=style)
        self.git_shallow = w.Checkbox(value=True, description="shallow (latest commit only)", indent=False)
        self.git_token = w.Password(description="Token", placeholder="for a private https repository",
                                    layout=w.Layout(width="400px"), style=style)
        self.add_git_button = w.Button(description="Add repository", button_style="primary", icon="code-fork")
        self.add_git_button.on_click(lambda _: self.add_git())
        # --- uploads
        self.upload = w.FileUpload(multiple=True, description="Choose files")
        self.add_upload_button = w.Button(description="Add uploaded files", button_style="primary", icon="upload")
        self.add_upload_button.on_click(lambda _: self.add_uploads())
        # --- server-side paths
        self.folder_path = w.Text(description="Folder", placeholder="/path/to/project on the server", layout=wide,
                                  style=style)
        self.add_folder_button = w.Button(description="Add folder", button_style="primary", icon="folder")
        self.add_folder_button.on_click(lambda _: self.add_folder())
        self.archive_path = w.Text(description="Archive", placeholder="/path/to/code.zip|.tar.gz|.tgz|.tar.bz2|"
                                   ".tar.xz on the server", layout=wide, style=style)
        self.add_archive_button = w.Button(description="Add archive", button_style="primary", icon="file-archive-o")
        self.add_archive_button.on_click(lambda _: self.add_archive())
        self.as_test = w.Checkbox(value=False, description="hold out what I add as test", indent=False)

        for widget, name in ((self.git_url, "git-url"), (self.add_git_button, "add-git"),
                             (self.folder_path, "folder-path"), (self.add_folder_button, "add-folder"),
                             (self.archive_path, "archive-path"), (self.add_archive_button, "add-archive"),
                             (self.upload, "upload"), (self.add_upload_button, "add-upload")):
            widget.add_class(f"refact-lab-sources-{name}")

        # --- the list
        self.sources = w.Select(options=[], rows=8, layout=w.Layout(width="720px"))
        self.sources.add_class("refact-lab-sources-list")
        self.sources.observe(lambda _: self._show_selected(), "value")
        self.selected_info = w.HTML()
        self.test_button = w.Button(description="Mark as test", icon="flask")
        self.update_button = w.Button(description="Update", icon="refresh",
                                      tooltip="git: fetch new commits, then re-scan (only changed files are read)")
        self.remove_button = w.Button(description="Remove", button_style="danger", icon="trash")
        self.test_button.on_click(lambda _: self.toggle_test())
        self.update_button.on_click(lambda _: self.update_selected())
        self.remove_button.on_click(lambda _: self.remove_selected())
        self.message = w.HTML()
        self.message.add_class("refact-lab-sources-message")

        self._buttons = [self.add_git_button, self.add_upload_button, self.add_folder_button,
                         self.add_archive_button, self.test_button, self.update_button, self.remove_button]
        section = lambda title: w.HTML(f"<b>{title}</b>")  # noqa: E731
        self.widget = w.VBox([
            w.HTML("<h3 style='margin:4px 0'>Sources</h3>"),
            section("Git repository"), self.git_url, w.HBox([self.git_branch, self.git_shallow]), self.git_token,
            w.HTML("<span style='color:#777'>For ssh URLs, generate a deploy key in the Settings tab and add it "
                   "to the repository (read-only).</span>"),
            self.add_git_button,
            section("Upload files or archives"), w.HBox([self.upload, self.add_upload_button]),
            section("On the server"), w.HBox([self.folder_path, self.add_folder_button]),
            w.HBox([self.archive_path, self.add_archive_button]),
            self.as_test, self.message, w.HTML("<hr>"),
            section("Sources of this project"), self.sources, self.selected_info,
            w.HBox([self.test_button, self.update_button, self.remove_button]),
        ])
        self.widget.add_class("refact-lab-sources")
        self._unsubscribe = service.subscribe(lambda event: self.refresh() if event == "sources" else None)
        self.refresh()

    # --- running actions --------------------------------------------------------------------------------

    def _run(self, label: str, action: Callable[[], str]) -> None:
        """Run `action` (which returns a success message) off the kernel's main thread, one at a time."""
        if self._worker is not None and self._worker.is_alive():
            self._error("Still working on the previous action; wait for it to finish.")
            return

        def work():
            for b in self._buttons:
                b.disabled = True
            self.message.value = f"<i>{html.escape(label)}…</i>"
            try:
                self._info(action())
            except Exception as e:  # every failure is shown in the panel, none is raised into the kernel
                self._error(str(e) or type(e).__name__)
            finally:
                for b in self._buttons:
                    b.disabled = False
                self.refresh()

        if self.background:
            self._worker = threading.Thread(target=work, name="sources-panel-action", daemon=True)
            self._worker.start()
        else:
            work()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the running action (for tests and notebooks)."""
        if self._worker is not None:
            self._worker.join(timeout)

    # --- adding -----------------------------------------------------------------------------------------

    def add_git(self) -> None:
        url, branch, shallow = self.git_url.value.strip(), self.git_branch.value.strip(), self.git_shallow.value
        token, test = self.git_token.value.strip(), self.as_test.value
        if not url:
            self._error("Enter a repository URL or path.")
            return

        def action():
            src = self.service.add_git(url, branch=branch or None, shallow=shallow, token=token or None, test=test)
            self.git_url.value = self.git_token.value = ""
            return f"Added {src.label} at {src.commit[:10]}."

        self._run(f"Cloning {url}", action)

    def add_uploads(self) -> None:
        files = [(f["name"], bytes(f["content"])) for f in self.upload.value]
        if not files:
            self._error("Choose files first.")
            return
        test = self.as_test.value

        def action():
            added = self.service.add_uploads(files, test=test)
            self.upload.value = ()
            return "Added " + "; ".join(s.label for s in added) + "."

        self._run(f"Adding {len(files)} uploaded file(s)", action)

    def add_folder(self) -> None:
        path, test = self.folder_path.value.strip(), self.as_test.value
        if not path:
            self._error("Enter a folder path.")
            return

        def action():
            src = self.service.add_folder(path, test=test)
            self.folder_path.value = ""
            return f"Added {src.label}."

        self._run(f"Adding {path}", action)

    def add_archive(self) -> None:
        path, test = self.archive_path.value.strip(), self.as_test.value
        if not path:
            self._error("Enter an archive path.")
            return

        def action():
            src = self.service.add_archive(path, test=test)
            self.archive_path.value = ""
            return f"Added {src.label}."

        self._run(f"Extracting {path}", action)

    # --- the list ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        try:
            sources = self.service.list_sources()
        except (ValueError, OSError) as e:   # a damaged source.json: say which, not a traceback in the notebook
            self._error(str(e))
            sources = []
        current = self.sources.value
        options = [(f"{s.label}  ·  {s.origin}", s.id) for s in sources]
        self.sources.options = options
        ids = [s.id for s in sources]
        self.sources.value = current if current in ids else (ids[-1] if ids else None)
        self._show_selected()

    def _selected(self):
        sid = self.sources.value
        return next((s for s in self.service.list_sources() if s.id == sid), None) if sid else None

    def _chosen(self):
        """The selected source for a button; None, said and the list refreshed, when it is gone meanwhile
        (removed from another panel or kernel)."""
        src = self._selected()
        if src is None and self.sources.value:
            self._error("That source is gone (removed elsewhere); the list is refreshed.")
            self.refresh()
        return src

    def _show_selected(self) -> None:
        src = self._selected()
        for b in (self.test_button, self.update_button, self.remove_button):
            b.disabled = src is None
        if src is None:
            self.selected_info.value = "<i>No sources yet.</i>" if not self.sources.options else ""
            return
        self.test_button.description = "Mark as train" if src.test else "Mark as test"
        self.update_button.disabled = src.kind not in ("git", "archive")
        bits = [f"<b>{html.escape(src.kind)}</b> {html.escape(src.origin)}"]
        if src.branch:
            bits.append(f"branch {html.escape(src.branch)}")
        if src.commit:
            bits.append(f"commit {src.commit[:10]}")
        if src.last_update and "changed" in src.last_update:
            bits.append(f"last update: {html.escape(str(src.last_update['changed']))} file(s) changed")
        bits.append("held out as <b>test</b>" if src.test else "used for training")
        self.selected_info.value = " · ".join(bits)

    def toggle_test(self) -> None:
        src = self._chosen()
        if src is None:
            return
        self._run("Saving", lambda: f"{self.service.set_source_test(src.id, not src.test).label}.")

    def update_selected(self) -> None:
        src = self._chosen()
        if src is None:
            return

        def action():
            updated = self.service.update_source(src.id)
            info = updated.last_update or {}
            changed = info.get("changed", 0)
            try:
                self.service.start_scan()
            except RuntimeError as e:   # a scan is already running: the update still happened
                return f"Updated {updated.name}: {changed} file(s) changed. {e}"
            return f"Updated {updated.name}: {changed} file(s) changed; re-scanning (see the Scan tab)."

        self._run(f"Updating {src.name}", action)

    def remove_selected(self) -> None:
        src = self._chosen()
        if src is None:
            return

        def action():
            self.service.remove_source(src.id)
            return f"Removed {src.label} (a local folder itself is never deleted)."

        self._run(f"Removing {src.name}", action)

    def close(self) -> None:
        self._unsubscribe()
