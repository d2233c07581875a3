"""The Scan panel: a view over `refact_lab.data.service.ProjectService`.

Settings come from a form built from `ScanSettings`' field metadata (tooltip = help, bounds from min/max);
the file types offered are the ones the last scan detected, with their counts. Start runs the scan as a
background job; while it runs, a poller thread reads the job's status from disk and moves the progress bar,
so the kernel (and Voilà's page) stays responsive. When it finishes the panel shows counts per reason as a
bar chart, and the accepted and rejected files in a data grid (ipydatagrid: sort and filter from any column
header; which source each file came from, its reason, detail and loss), pre-filtered by reason, language and
path; a click on a row selects the file to force-include, force-exclude or hold out before re-running. When the
sources changed after the last scan, a hint says to rescan. "auto" fields show what the last scan applied.

No file I/O, torch or subprocess here: every action is a service call (STYLE.md point 7).
"""

from __future__ import annotations

import base64
import html
import io
import threading

import ipywidgets as w
from ipydatagrid import DataGrid

from refact_lab.config import ScanSettings, SettingsError, field_specs
from refact_lab.data.pipeline import human_size
from refact_lab.ui.fields import SettingField
from refact_lab.ui.messages import MessageMixin

ACTIVE = ("queued", "running")
MAX_ROWS = 5000         # rows sent to the grid at once (all rows of a big scan would be megabytes of JSON)
COLUMNS = ["file", "source", "outcome", "detail", "set", "language", "loss", "KiB"]
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
        self.stale_hint = w.HTML()
        self.stale_hint.add_class("refact-lab-scan-stale")
        self.selected_key: str | None = None
        self._shown: list[dict] = []

        # --- settings form (file types get their own widget: the detected types with counts)
        specs = [s for s in field_specs(ScanSettings) if s["name"] != "file_types"]
        self.fields = {s["name"]: SettingField(s, css_class=f"refact-lab-scan-field-{s['name']}", width="360px",
                                                label_width="180px") for s in specs}
        self.types = w.SelectMultiple(options=[], rows=5, description="file types",
                                      tooltip=next(s["help"] for s in field_specs(ScanSettings)
                                                   if s["name"] == "file_types"),
                                      layout=w.Layout(width="360px"), style={"description_width": "180px"})
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
        self.grid = DataGrid(self._frame([]), selection_mode="row", header_visibility="column",
                             base_column_size=90, base_row_size=22, base_column_header_size=24,
                             column_widths={"file": 300, "source": 170, "outcome": 140, "detail": 260},
                             layout=w.Layout(height="380px", width="100%"))
        self.grid.add_class("refact-lab-scan-files")
        self.grid.on_cell_click(self._on_cell_click)
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
            w.HTML("<h3 style='margin:4px 0'>Scan</h3>"), self.sources_info, self.stale_hint,
            w.HTML("<b>Settings</b> <span style='color:#777'>(hover a field for its help)</span>"), form,
            w.HBox([self.scan_button, self.stop_button, self.progress, self.progress_text]), self.message,
            w.HTML("<hr>"), self.summary, self.chart,
            w.HBox([self.show, self.reason, self.language, self.path_filter]), self.list_info, self.grid,
            self.selected_info,
            w.HBox([self.include_button, self.exclude_button, self.clear_button, self.test_button,
                    self.rerun_button]),
        ])
        self.widget.add_class("refact-lab-scan")

        try:
            self.set_settings(service.last_settings())
        except ValueError as e:   # damaged stats of the last scan: the form keeps its defaults, the reason is shown
            self._error(str(e))
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
        try:
            if not self.service.list_sources():
                self._error("No sources yet: add a repository, files, a folder or an archive in the Sources tab.")
                return False
            self.service.start_scan(settings)
        except (RuntimeError, ValueError) as e:
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
        key = self.selected_key
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
        if event in ("sources", "overrides"):
            self.refresh_sources()
            self.refresh_stale()
        elif event == "scan-started":
            self.refresh_stale()
            self._ensure_poller()
        elif event == "scan-finished":
            self.sync()

    def refresh_sources(self) -> None:
        try:
            sources = self.service.list_sources()
        except ValueError as e:   # a damaged source.json: the Sources tab says the same
            self.sources_info.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return
        if not sources:
            self.sources_info.value = "<i>No sources yet: add some in the Sources tab.</i>"
            return
        items = "".join(f"<li>{html.escape(s.label)}</li>" for s in sources)
        self.sources_info.value = f"<b>{len(sources)} source(s)</b><ul style='margin:2px 0'>{items}</ul>"

    def refresh_stale(self) -> None:
        """Say so when the sources changed since the results shown were computed (the service decides)."""
        try:
            why = [] if self.service.scanning else self.service.stale_reasons()
        except ValueError as e:   # damaged stats or overrides: the hint says so instead of raising
            why = [f"cannot compare with the last scan: {e}"]
        if not why:
            self.stale_hint.value = ""
            return
        self.stale_hint.value = ("<div style='color:#7a4d00;background:#fff8c5;padding:4px 8px'>"
                                 f"<b>{'Sources changed' if any(r.startswith('source') for r in why) else 'Changed'}"
                                 " since the last scan: rescan.</b> "
                                 f"{html.escape('; '.join(why))}. The results below are from the previous "
                                 "sources; press Scan to bring them up to date.</div>")

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
            try:
                self.results = self.service.results()
            except ValueError as e:   # damaged results on disk: shown, and a new scan replaces them
                self.results = None
                self._error(f"{e}; scan again to replace them")
                self.summary.value = "<i>No scan results to show.</i>"
                self.render_list()
                return
            stats = self.results.stats
            self.refresh_stale()
            self._show_auto_values(stats)
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

    def _show_auto_values(self, stats: dict | None) -> None:
        """The loss threshold "auto" stood for: the one the last scan applied, else the model's default."""
        applied = self.service.applied_loss_threshold() if stats else None
        if applied is not None:
            self.fields["loss_threshold"].show_auto(float(applied), "applied by the last scan")
            return
        default = self.service.default_loss_threshold(self.fields["model"].get() or None)
        if default is not None:
            self.fields["loss_threshold"].show_auto(default, "the model's default")

    def _render_summary(self, stats: dict) -> None:
        rows = "".join(f"<tr><td>{html.escape(r)}</td><td style='text-align:right'>{n}</td></tr>"
                       for r, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]))
        split = ""
        if stats["reasons"].get("loss_too_high") and stats["accepted"] == 0:
            split += ("<div style='color:#a60'>Every file that reached stage 2 is above the loss threshold: the "
                      "model may be too weak for this code. Pick a stronger model, raise the "
                      f"{self.fields['loss_threshold'].label}, or turn the {self.fields['lm_filter'].label} "
                      "off.</div>")
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
    def _frame(rows: list[dict]):
        import pandas as pd

        return pd.DataFrame(rows, columns=COLUMNS)

    def _source_labels(self) -> dict[str, str]:
        try:
            return {s.id: s.label for s in self.service.list_sources()}
        except ValueError:   # a damaged source.json, shown above the form: rows still list by source id
            return {}

    def rows(self) -> list[dict]:
        """The grid's rows (one per shown file, in the order sent to the grid), as the user reads them."""
        labels = self._source_labels()
        out = []
        for r in self._shown:
            outcome = r["reason"] if r.get("reason") else "accepted" + (" (forced)" if r.get("forced") else "")
            out.append({"file": r["path"], "source": labels.get(r["source"], f"{r['source']} (removed)"),
                        "outcome": outcome, "detail": r.get("detail") or "", "set": r.get("set") or "",
                        "language": r.get("language") or "unknown",
                        # text, so a file without a loss shows blank (the grid draws a missing number as
                        # NaN); padded to one width so sorting the text sorts the numbers
                        "loss": "" if r.get("loss") is None else f"{float(r['loss']):8.3f}",
                        "KiB": round((r.get("size") or 0) / 1024, 1)})
        return out

    def render_list(self) -> None:
        with self._lock:
            records = self.filtered()
            self._shown = records[:MAX_ROWS]
            self.grid.data = self._frame(self.rows())
            # as tall as the rows need (header + rows), at most 16 rows; the grid scrolls beyond that
            self.grid.layout.height = f"{24 + 22 * min(max(len(self._shown), 1), 16) + 20}px"
            more = f" (showing the first {MAX_ROWS}; narrow the filters)" if len(records) > MAX_ROWS else ""
            self.list_info.value = (f"<span class='n-files'>{len(records)}</span> file(s){more}. "
                                    "<span style='color:#777'>Click a row to select it; sort or filter from a "
                                    "column header's menu.</span>")
            self.selected_key = None
            self.selected_info.value = ""

    def _on_cell_click(self, cell: dict) -> None:
        if cell.get("region") != "body":
            return
        row = cell.get("primary_key_row")  # the row in the data sent, whatever the user sorted or filtered
        if row is not None and 0 <= row < len(self._shown):
            self.select(self._key(self._shown[row]))

    @staticmethod
    def _key(r: dict) -> str:
        return f"{r['source']}/{r['path']}"

    def keys(self) -> list[str]:
        """The keys (source id/path) of the shown rows, in grid order."""
        return [self._key(r) for r in self._shown]

    def select(self, key: str | None) -> None:
        """Select a file (a grid row click does this) and show what is known about it."""
        self.selected_key = key
        self._show_selected()

    def _show_selected(self) -> None:
        key = self.selected_key
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
        source = self._source_labels().get(rec["source"], rec["source"])
        self.selected_info.value = (
            f"<div class='refact-lab-scan-selected'><code>{html.escape(rec['path'])}</code> from "
            f"<b>{html.escape(source)}</b> · {html.escape(rec.get('language') or 'unknown')} · "
            f"{human_size(rec['size'])} · loss {loss} · {outcome}"
            + (f" · <i>{', '.join(marks)}</i>" if marks else "") + "</div>")

    def close(self) -> None:
        self._unsubscribe()
