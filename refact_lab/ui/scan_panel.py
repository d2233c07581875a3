"""The Scan panel: a view over `refact_lab.data.service.ProjectService`.

Settings come from a form built from `ScanSettings`' field metadata (tooltip = help, bounds from min/max);
the file types offered are the ones the last scan detected, with their counts. Start runs the scan as a
background job; while it runs, a poller thread reads the job's status from disk and moves the progress bar,
so the kernel (and Voilà's page) stays responsive. When it finishes the panel shows counts per reason as a
bar chart, the accepted and rejected files filterable by reason, language and path, each file's loss, and
lets the user force-include, force-exclude or hold out one file before re-running.

No file I/O, torch or subprocess here: every action is a service call (STYLE.md point 7).
"""

from __future__ import annotations

import base64
import html
import io
import threading

import ipywidgets as w

from refact_lab.config import ScanSettings, SettingsError, field_specs
from refact_lab.data.pipeline import human_size
from refact_lab.ui.fields import SettingField
from refact_lab.ui.messages import MessageMixin

ACTIVE = ("queued", "running")
MAX_ROWS = 500          # a Select with tens of thousands of options freezes the browser
_ALL = "(all)"


class ScanPanel(MessageMixin):
    """`ScanPanel(ProjectService(home)).widget` is the Scan tab."""

    def __init__(self, service, *, poll_s: float = 0.5):
        self.service = service
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self._poller: threading.Thread | None = None
        self.results = None
        self.chart_png: bytes | None = None
        self.last_error: str | None = None
        self._shown_finish: str | None = None
        self._said_scanning = False

        self.sources_info = w.HTML()
        self.sources_info.add_class("refact-lab-scan-sources")

        # --- settings form (file types get their own widget: the detected types with counts)
        specs = [s for s in field_specs(ScanSettings) if s["name"] != "file_types"]
        self.fields = {s["name"]: SettingField(s, css_class=f"refact-lab-scan-field-{s['name']}", width="330px",
                                                label_width="150px") for s in specs}
        self.types = w.SelectMultiple(options=[], rows=5, description="file types",
                                      tooltip=next(s["help"] for s in field_specs(ScanSettings)
                                                   if s["name"] == "file_types"),
                                      layout=w.Layout(width="330px"), style={"description_width": "150px"})
        self.types_auto = w.Checkbox(value=True, description="auto (most common code type)", indent=False,
                                     layout=w.Layout(width="260px"))
        self.types.disabled = True
        self.types_auto.observe(lambda ch: setattr(self.types, "disabled", ch["new"]), "value")
        items = [f.widget for f in self.fields.values()]
        half = (len(items) + 1) // 2
        form = w.VBox([w.HBox([self.types, self.types_auto]),
                       w.HBox([w.VBox(items[:half]), w.VBox(items[half:])])])

        # --- actions and progress
        self.scan_button = w.Button(description="Scan", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.scan_button.add_class("refact-lab-scan-start")
        self.stop_button.add_class("refact-lab-scan-stop")
        self.scan_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="360px"))
        self.progress_text = w.HTML()
        self.progress_text.add_class("refact-lab-scan-progress")
        self.message = w.HTML()
        self.message.add_class("refact-lab-scan-message")

        # --- results
        self.summary = w.HTML()
        self.summary.add_class("refact-lab-scan-summary")
        self.chart = w.Output(layout=w.Layout(min_height="60px"))
        self.chart.add_class("refact-lab-scan-chart")
        self.show = w.ToggleButtons(options=["rejected", "accepted", "all"], value="rejected",
                                    style={"button_width": "90px"})
        self.reason = w.Dropdown(options=[_ALL], value=_ALL, description="reason", layout=w.Layout(width="260px"))
        self.language = w.Dropdown(options=[_ALL], value=_ALL, description="language",
                                   layout=w.Layout(width="260px"))
        self.path_filter = w.Text(placeholder="part of the path", description="path", continuous_update=False,
                                  layout=w.Layout(width="300px"))
        for widget in (self.show, self.reason, self.language, self.path_filter):
            widget.observe(lambda _: self.render_list(), "value")
        self.files = w.Select(options=[], rows=14, layout=w.Layout(width="100%"))
        self.files.add_class("refact-lab-scan-files")
        self.files.observe(lambda _: self._show_selected(), "value")
        self.list_info = w.HTML()
        self.list_info.add_class("refact-lab-scan-list-info")
        self.selected_info = w.HTML()
        self.include_button = w.Button(description="Force include", icon="plus")
        self.exclude_button = w.Button(description="Force exclude", icon="minus")
        self.clear_button = w.Button(description="Clear override", icon="undo")
        self.test_button = w.Button(description="Hold out as test", icon="flask")
        self.rerun_button = w.Button(description="Re-run scan", button_style="info", icon="refresh")
        for b, act in ((self.include_button, "include"), (self.exclude_button, "exclude"),
                       (self.clear_button, "clear"), (self.test_button, "test")):
            b.on_click(lambda _, act=act: self.override(act))
        self.rerun_button.on_click(lambda _: self.start())

        self.widget = w.VBox([
            w.HTML("<h3 style='margin:4px 0'>Scan</h3>"), self.sources_info,
            w.HTML("<b>Settings</b> <span style='color:#777'>(hover a field for its help)</span>"), form,
            w.HBox([self.scan_button, self.stop_button, self.progress, self.progress_text]), self.message,
            w.HTML("<hr>"), self.summary, self.chart,
            w.HBox([self.show, self.reason, self.language, self.path_filter]), self.list_info, self.files,
            self.selected_info,
            w.HBox([self.include_button, self.exclude_button, self.clear_button, self.test_button,
                    self.rerun_button]),
        ])
        self.widget.add_class("refact-lab-scan")

        self.set_settings(service.last_settings())
        self._unsubscribe = service.subscribe(self._on_event)
        self.refresh_sources()
        self.load_results()   # the last finished scan, even if a later one failed or was stopped
        self._shown_finish = service.scan_status().get("finished_at")
        self.sync()
        if self.service.scanning:
            self._ensure_poller()

    # --- settings -------------------------------------------------------------------------------------

    def settings(self) -> ScanSettings:
        values = {name: f.get() for name, f in self.fields.items()}
        values["file_types"] = None if self.types_auto.value else list(self.types.value)
        return ScanSettings(**values)

    def set_settings(self, settings: ScanSettings) -> None:
        for name, f in self.fields.items():
            f.set(getattr(settings, name))
        self.types_auto.value = settings.file_types is None
        if settings.file_types:
            known = [v for _, v in self.types.options]
            self.types.options = list(self.types.options) + [(t, t) for t in settings.file_types if t not in known]
            self.types.value = tuple(settings.file_types)

    # --- actions --------------------------------------------------------------------------------------

    def start(self) -> bool:
        try:
            settings = self.settings()
        except SettingsError as e:
            self._error(str(e))
            return False
        if not self.service.list_sources():
            self._error("No sources yet: add a repository, files, a folder or an archive in the Sources tab.")
            return False
        try:
            self.service.start_scan(settings)
        except RuntimeError as e:
            self._error(str(e))
            return False
        self._info("Scanning...")
        self._said_scanning = True
        self.sync()
        self._ensure_poller()
        return True

    def stop(self) -> None:
        self.service.stop_scan()
        self._info("Stopping at the next step...")

    def override(self, action: str) -> None:
        key = self.files.value
        if not key:
            self._error("Select a file in the list first.")
            return
        if action == "include":
            self.service.force_include(key)
        elif action == "exclude":
            self.service.force_exclude(key)
        elif action == "clear":
            self.service.clear_override(key)
        elif action == "test":
            held = key in self.service.overrides()["test"]
            self.service.mark_file_test(key, not held)
        self._info(f"{key}: saved. Press 'Re-run scan' to apply.")
        self._show_selected()

    # --- status ---------------------------------------------------------------------------------------

    def _on_event(self, event: str) -> None:
        if event == "sources":
            self.refresh_sources()
        elif event == "scan-started":
            self._ensure_poller()
        elif event == "scan-finished":
            self.sync()

    def refresh_sources(self) -> None:
        sources = self.service.list_sources()
        if not sources:
            self.sources_info.value = "<i>No sources yet: add some in the Sources tab.</i>"
            return
        items = "".join(f"<li>{html.escape(s.label)}</li>" for s in sources)
        self.sources_info.value = f"<b>{len(sources)} source(s)</b><ul style='margin:2px 0'>{items}</ul>"

    def sync(self) -> dict:
        """Read the job's status and show it; load the results when a scan has just finished."""
        with self._lock:
            status = self.service.scan_status()
            state = status.get("state", "idle")
            running = state in ACTIVE
            self.scan_button.disabled = self.rerun_button.disabled = running
            self.stop_button.disabled = not running
            total, done = status.get("total") or 0, status.get("done") or 0
            self.progress.max = max(1, total)
            self.progress.value = min(done, self.progress.max)
            self.progress.bar_style = {"finished": "success", "failed": "danger", "stopped": "warning"}.get(state, "")
            text = html.escape(status.get("message") or state)
            if status.get("error"):
                text += f" <span style='color:#b00'>{html.escape(status['error'])}</span>"
            self.progress_text.value = text
            if not running and self._said_scanning:
                self._said_scanning = False   # the progress line now tells how it ended
                self.message.value = ""
            finished_at = status.get("finished_at")
            if state == "finished" and finished_at and finished_at != self._shown_finish:
                self._shown_finish = finished_at
                self.load_results()
            elif state == "failed" and status.get("error"):
                self.last_error = status["error"]
            return status

    def _ensure_poller(self) -> None:
        if not self.poll_s or self.poll_s <= 0:
            return
        with self._lock:
            if self._poller is not None and self._poller.is_alive():
                return
            self._poller = threading.Thread(target=self._poll, name="scan-panel-poll", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        # Poll until the job is over, then once more so the final state and the results are shown.
        stop = threading.Event()
        while not stop.wait(self.poll_s):
            try:
                status = self.sync()
            except Exception as e:  # a transient read error must not kill the live view
                self.last_error = f"refresh failed: {e}"
                continue
            if status.get("state") not in ACTIVE and not self.service.job.running:
                self.sync()  # the final state, and the results if the scan finished
                return

    # --- results --------------------------------------------------------------------------------------

    def load_results(self) -> None:
        with self._lock:
            self.results = self.service.results()
            stats = self.results.stats
            if not stats:
                self.summary.value = "<i>No scan yet.</i>"
                self.render_list()
                return
            # the detected types, with counts, become the type choices
            counts = stats.get("types") or {}
            options = [(f"{t} ({n})", t) for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                       if t != "unknown"]
            valid = {t for _, t in options}
            current = [t for t in self.types.value if t in valid]
            self.types.options = options
            self.types.value = tuple(current or [t for t in stats.get("types_on", []) if t in valid])
            reasons = stats.get("reasons") or {}
            self.reason.options = [_ALL] + list(reasons)
            langs = sorted({r.get("language") or "unknown" for r in self.results.all})
            self.language.options = [_ALL] + langs
            self._render_summary(stats)
            self._draw_chart(stats)
            self.render_list()

    def _render_summary(self, stats: dict) -> None:
        rows = "".join(f"<tr><td>{html.escape(r)}</td><td style='text-align:right'>{n}</td></tr>"
                       for r, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]))
        split = ""
        if stats["reasons"].get("loss_too_high") and stats["accepted"] == 0:
            split += ("<div style='color:#a60'>Every file that reached stage 2 is above the loss threshold: the "
                      "model may be too weak for this code. Pick a stronger model, raise loss_threshold, or turn "
                      "lm_filter off.</div>")
        if stats.get("split_error"):
            split += f"<div style='color:#b00'><b>No train/test split:</b> {html.escape(stats['split_error'])}</div>"
        loss = ""
        if stats.get("loss"):
            loss = (f"<br>loss filter: {html.escape(str(stats['loss']['model']))} "
                    f"({stats['loss']['computed']} computed, {stats['loss']['cached']} from cache)")
        self.summary.value = (
            f"<div><b>{stats['files']} files</b>: <span class='accepted-count'>{stats['accepted']}</span> "
            f"accepted (train {stats['train']['files']} files, {human_size(stats['train']['bytes'])}; "
            f"test {stats['test']['files']} files, {human_size(stats['test']['bytes'])}), "
            f"<span class='rejected-count'>{stats['rejected']}</span> rejected. "
            f"Types on: {html.escape(', '.join(stats.get('types_on') or []) or 'none')}. "
            f"<span style='color:#777'>({stats['elapsed_s']:.1f} s, {stats['files_read']} files read)</span>{loss}"
            f"<table style='margin-top:4px'>{rows}</table>{split}</div>")

    def _draw_chart(self, stats: dict) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        reasons = sorted(stats["reasons"].items(), key=lambda kv: kv[1])
        labels = [r for r, _ in reasons] + ["accepted"]
        values = [n for _, n in reasons] + [stats["accepted"]]
        # A Figure without pyplot: no global state, safe from the poller thread, no backend needed.
        fig = Figure(figsize=(7, 0.45 * len(labels) + 0.9), dpi=90)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        colors = ["#c44e52"] * len(reasons) + ["#55a868"]
        bars = ax.barh(labels, values, color=colors)
        ax.bar_label(bars, padding=3, fontsize=8)
        ax.set_xlabel("files")
        ax.set_title(f"{stats['files']} files by outcome", fontsize=10)
        ax.margins(x=0.15)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.chart_png = buf.getvalue()
        # Setting `outputs` works from any thread (unlike `with output:`) and needs no inline backend.
        self.chart.outputs = ({"output_type": "display_data", "metadata": {},
                               "data": {"image/png": base64.b64encode(self.chart_png).decode("ascii"),
                                        "text/plain": "counts per reason: " + ", ".join(
                                            f"{l} {v}" for l, v in zip(labels, values))}},)

    def filtered(self) -> list[dict]:
        """The records the filters select (accepted, rejected or all; reason; language; path substring)."""
        if self.results is None:
            return []
        show = self.show.value
        records = (self.results.rejected if show == "rejected" else self.results.accepted if show == "accepted"
                   else self.results.all)
        reason, lang, part = self.reason.value, self.language.value, self.path_filter.value.strip().lower()
        out = []
        for r in records:
            if reason != _ALL and r.get("reason", "accepted") != reason:
                continue
            if lang != _ALL and (r.get("language") or "unknown") != lang:
                continue
            if part and part not in r["path"].lower():
                continue
            out.append(r)
        return out

    @staticmethod
    def _label(r: dict) -> str:
        parts = [r["path"], r.get("language") or "unknown"]
        if r.get("reason"):
            parts.append(f"{r['reason']}: {r['detail']}")
        else:
            parts.append(f"accepted ({r['set']})" + (" · forced" if r.get("forced") else ""))
        if r.get("loss") is not None:
            parts.append(f"loss {r['loss']:.2f}")
        return "  ·  ".join(parts)

    def render_list(self) -> None:
        with self._lock:
            records = self.filtered()
            shown = records[:MAX_ROWS]
            self.files.options = [(self._label(r), f"{r['source']}/{r['path']}") for r in shown]
            more = f" (showing the first {MAX_ROWS}; narrow the filters)" if len(records) > MAX_ROWS else ""
            self.list_info.value = f"<span class='n-files'>{len(records)}</span> file(s){more}"
            self.selected_info.value = ""

    def _show_selected(self) -> None:
        key = self.files.value
        if not key or self.results is None:
            self.selected_info.value = ""
            return
        rec = next((r for r in self.results.all if f"{r['source']}/{r['path']}" == key), None)
        if rec is None:
            return
        ov = self.service.overrides()
        marks = [name for name, label in (("include", "force-included"), ("exclude", "force-excluded"),
                                          ("test", "held out as test")) if key in ov[name]]
        loss = "-" if rec.get("loss") is None else f"{rec['loss']:.3f}"
        outcome = (f"rejected: <b>{html.escape(rec['reason'])}</b> ({html.escape(rec['detail'])})"
                   if rec.get("reason") else f"accepted into <b>{rec['set']}</b>")
        self.selected_info.value = (
            f"<div><code>{html.escape(key)}</code> · {html.escape(rec.get('language') or 'unknown')} · "
            f"{human_size(rec['size'])} · loss {loss} · {outcome}"
            + (f" · <i>{', '.join(marks)}</i>" if marks else "") + "</div>")

    def close(self) -> None:
        self._unsubscribe()
