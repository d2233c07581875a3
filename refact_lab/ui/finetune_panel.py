"""The Fine-tune panel: a view over `refact_lab.finetune.runs.RunService`.

Choose a model and a scanned dataset, set hyperparameters in a form built from `FinetuneSettings`' field
metadata (tooltip = help, range = bounds, "auto" boxes for derived values), see the auto numbers before
starting, start / stop / resume runs, and watch a run: progress with ETA, train and test loss over steps,
checkpoints with the best one marked, and the log.

Everything shown comes from the run's files, read through the service by a background thread every
`poll_s` seconds, so the plot keeps growing while the run trains and a reloaded page shows the same run.
Given the app's ProjectService (`projects`), the dataset list is re-read when a scan finishes, and the project
just scanned is selected. A message about something in progress ("Stopping...", "Resuming...") is replaced
once the run's state says it is over. The panel does no file I/O and never touches torch: buttons call
service methods (STYLE.md point 7).
"""

from __future__ import annotations

import base64
import html
import io
import threading
import time

import ipywidgets as w

from refact_lab.config import FinetuneSettings, LaunchSettings, SettingsError, field_specs
from refact_lab.ui.fields import SettingField
from refact_lab.ui.messages import MessageMixin

ACTIVE = ("queued", "running")
LOG_LINES = 200
# auto fields whose derived number the preview shows in the (disabled) box
PREVIEW_FIELDS = ("seq_len", "train_steps", "warmup_steps", "lr_decay_steps", "eval_every", "checkpoint_every")


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


class FinetunePanel(MessageMixin):
    """`FinetunePanel(RunService(home)).widget` is the Fine-tune tab."""

    def __init__(self, service, *, projects=None, poll_s: float = 1.0):
        self.service = service
        self.poll_s = poll_s
        # a message about something in progress, replaced once the run reaches one of these states:
        # (run_id, states, what to say then)
        self._pending: tuple[str, tuple[str, ...], str] | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._preview_due = True
        self._drawn_key: tuple | None = None
        self._runs_key: tuple | None = None
        self._updating_runs = False
        self._showing_auto = False
        self.last_error: str | None = None

        # --- choose model and dataset
        models = service.models()
        self.model = w.Combobox(options=models, value=models[0] if models else "default", ensure_option=False,
                                description="Model", placeholder="registry name, hub id or local folder",
                                tooltip="A registry name, a hub id (Qwen/Qwen2.5-Coder-1.5B) or a local folder",
                                layout=w.Layout(width="420px"))
        self.dataset = w.Dropdown(options=service.datasets(), description="Dataset",
                                  tooltip="A project with a finished scan", layout=w.Layout(width="420px"))
        self.model.add_class("refact-lab-finetune-model")
        self.dataset.add_class("refact-lab-finetune-dataset")
        self.reload_button = w.Button(description="Reload lists", icon="refresh", layout=w.Layout(width="130px"),
                                      tooltip="Re-read the models and the scanned datasets")
        self.reload_button.on_click(lambda _: self._reload_clicked())

        # --- the hyperparameter form
        self.fields = {spec["name"]: SettingField(spec, css_class=f"refact-lab-field-{spec['name']}")
                       for spec in field_specs(FinetuneSettings)}
        for field in self.fields.values():
            field.observe(self._form_changed)
        self.model.observe(self._form_changed, "value")
        self.dataset.observe(self._form_changed, "value")
        half = (len(self.fields) + 1) // 2
        items = [f.widget for f in self.fields.values()]
        form = w.HBox([w.VBox(items[:half]), w.VBox(items[half:])])
        # --- where it trains (LaunchSettings): the GPUs the service sees with their free memory, a process count
        launch_specs = {spec["name"]: spec for spec in field_specs(LaunchSettings)}
        self.launch_fields = {name: SettingField(launch_specs[name], css_class=f"refact-lab-launch-{name}")
                              for name in ("processes", "cpu", "fsdp")}
        self.gpus = w.SelectMultiple(options=[], description="GPUs", tooltip=launch_specs["gpus"]["help"], rows=3,
                                     layout=w.Layout(width="420px"))
        self.gpus.add_class("refact-lab-launch-gpus")
        self.devices_text = w.HTML()
        self.devices_text.add_class("refact-lab-launch-devices")
        self.reload_devices()
        for field in self.launch_fields.values():
            field.observe(self._form_changed)
        self.gpus.observe(self._form_changed, "value")
        self.auto_numbers = w.HTML("<i>auto numbers appear here once a dataset is chosen</i>")
        self.auto_numbers.add_class("refact-lab-auto-numbers")

        # --- actions
        self.start_button = w.Button(description="Start", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.resume_button = w.Button(description="Resume", button_style="info", icon="repeat", disabled=True)
        for button, name in ((self.start_button, "start"), (self.stop_button, "stop"),
                             (self.resume_button, "resume")):
            button.add_class(f"refact-lab-finetune-{name}")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.resume())
        self.message = w.HTML()
        self.message.add_class("refact-lab-finetune-message")

        # --- the selected run
        self.runs = w.Select(options=[], rows=6, description="Runs", layout=w.Layout(width="620px"))
        self.runs.observe(self._run_selected, "value")
        self.progress = w.FloatProgress(value=0, min=0, max=1, layout=w.Layout(width="420px"))
        self.progress_text = w.HTML()
        self.progress_text.add_class("refact-lab-progress-text")
        self.plot = w.Output(layout=w.Layout(min_height="300px"))
        self.plot.add_class("refact-lab-loss-plot")
        self.plot_caption = w.HTML()
        self.plot_caption.add_class("refact-lab-loss-caption")
        self.checkpoints = w.HTML()
        self.checkpoints.add_class("refact-lab-checkpoints")
        self.log = w.HTML()
        self.log.add_class("refact-lab-run-log")

        setup = w.VBox([w.HBox([w.VBox([self.model, self.dataset]), self.reload_button]),
                        w.HTML("<b>Hyperparameters</b> <span style='color:#777'>(hover a field for its help; "
                               "'auto' derives it from the dataset size)</span>"),
                        form, w.HTML("<b>Devices</b>"), w.HBox([self.devices_text, self.gpus]),
                        w.HBox([f.widget for f in self.launch_fields.values()]), self.auto_numbers,
                        w.HBox([self.start_button, self.stop_button, self.resume_button]), self.message])
        # the completion scoreboard of the selected run (base vs its evaluated checkpoints), beside the loss plot
        from refact_lab.scoreboard.service import ScoreboardService
        from refact_lab.ui.scoreboard_panel import ScoreboardPanel

        self.scoreboard = ScoreboardPanel(ScoreboardService(service.home), follow=self.runs)
        watch = w.VBox([self.runs, w.HBox([self.progress, self.progress_text]), self.plot, self.plot_caption,
                        self.scoreboard.widget,
                        w.HTML("<b>Checkpoints</b>"), self.checkpoints, w.HTML("<b>Log</b>"), self.log])
        self.widget = w.VBox([setup, w.HTML("<hr>"), watch])
        self.widget.add_class("refact-lab-finetune")

        self.refresh()
        if not self.dataset.value and self.dataset.options:
            self.dataset.value = self.dataset.options[0]
        self._projects = projects
        self._unsubscribe = projects.subscribe(self._on_project_event) if projects is not None else None
        self._thread = None
        if poll_s and poll_s > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="finetune-panel-poll", daemon=True)
            self._thread.start()

    # --- form ---------------------------------------------------------------------------------------------

    def _form_changed(self, _change=None) -> None:
        if not self._showing_auto:
            self._preview_due = True

    def settings(self) -> FinetuneSettings:
        """The form's values as settings; raises SettingsError with the field's name when one is invalid."""
        values = {name: field.get() for name, field in self.fields.items()}
        return FinetuneSettings(**values)

    def reload_devices(self) -> None:
        """Re-read the GPUs (and their free memory); without any, the run trains on the CPU."""
        devices = self._devices = self.service.devices()
        options = [(f"GPU {d.index}: {d.label}, {d.free / 2 ** 30:.1f} of {d.total / 2 ** 30:.1f} GiB free", d.index)
                   for d in devices]
        if list(self.gpus.options) != options:
            self.gpus.options = options
            self.gpus.value = tuple(index for _, index in options)
        self.gpus.layout.display = None if devices else "none"
        cpu = self.launch_fields["cpu"]
        if not devices:
            cpu.input.value = True
        cpu.input.disabled = not devices
        self.launch_fields["fsdp"].input.disabled = len(devices) < 2
        self.devices_text.value = "" if devices else "<b>CPU</b> <span style='color:#777'>(no GPU visible)</span>"

    def launch_settings(self) -> LaunchSettings:
        """The device controls as LaunchSettings; raises SettingsError naming the field when one is invalid."""
        values = {name: field.get() for name, field in self.launch_fields.items()}
        gpus = None if values["cpu"] or not self.gpus.options else list(self.gpus.value)
        return LaunchSettings(**values, gpus=gpus)

    def set_settings(self, settings: FinetuneSettings) -> None:
        for name, field in self.fields.items():
            field.set(getattr(settings, name))

    def reload_choices(self, prefer: str | None = None) -> None:
        """Re-read the model and dataset lists; keep the chosen dataset, else choose `prefer` or the first one
        (a Dropdown given new options keeps an empty value, which reads as "no dataset")."""
        with self._lock:
            models = self.service.models()
            if list(self.model.options) != models:
                self.model.options = models
            datasets = self.service.datasets()
            current = self.dataset.value
            if list(self.dataset.options) != datasets:
                self.dataset.options = datasets
            wanted = prefer if prefer in datasets else current if current in datasets else (
                datasets[0] if datasets else None)
            if self.dataset.value != wanted:
                self.dataset.value = wanted
            if wanted != current:
                self._preview_due = True

    def _on_project_event(self, event: str) -> None:
        # the ProjectService calls this from its scan thread: a new or re-scanned dataset appears at once
        if event == "scan-finished":
            self.reload_choices(prefer=getattr(self._projects, "project", None))
            self._preview_due = True

    def on_show(self) -> None:
        """The app calls this when the tab is opened: datasets scanned and runs started elsewhere appear."""
        self.reload_choices()
        self.refresh()

    def _reload_clicked(self) -> None:
        self.reload_choices()
        self.reload_devices()
        self._preview_due = True

    def update_preview(self) -> dict | None:
        """Show the numbers a run would use ("auto" resolved) for the current model, dataset and form."""
        self._preview_due = False
        if not self.dataset.value:
            self.auto_numbers.value = ("<i>No scanned dataset yet: add sources and run a scan in the Scan tab, "
                                       "then press Reload lists.</i>")
            return None
        try:
            launch = self.launch_settings()
            preview = self.service.preview(self.dataset.value, self.model.value, self.settings(),
                                           processes=launch.process_count)
        except Exception as e:  # noqa: BLE001 - any problem with the inputs is shown, not raised into the UI
            self.auto_numbers.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return None
        sched = preview["schedule"]
        # show the derived numbers in the (disabled) auto fields themselves
        self._showing_auto = True
        try:
            for name in PREVIEW_FIELDS:
                field = self.fields[name]
                if field.auto is not None and field.auto.value:
                    field.input.value = sched[name]
        finally:
            self._showing_auto = False
        try:   # how it would launch here, and whether it fits the devices' free memory
            memory = self.service.launch_preview(self.model.value, self.settings(), launch, self._devices)
            color = "#555"
        except (SettingsError, ValueError) as e:
            memory, color = str(e), "#b00"
        self.auto_numbers.value = (
            f"<div><b>This run will train {sched['train_steps']:,} steps</b> of {sched['seq_len']:,}-token rows "
            f"(warmup {sched['warmup_steps']:,}, LR decay over {sched['lr_decay_steps']:,}; "
            f"{sched['steps_per_epoch']:,} steps per epoch; test loss every {sched['eval_every']:,} steps)<br>"
            f"<span style='color:#555'>{html.escape(preview['explanation'])}<br>"
            f"{html.escape(preview['summary'])}</span><br><span class='refact-lab-launch-preview' "
            f"style='color:{color}'>{html.escape(memory)}</span></div>")
        return preview

    # --- actions ------------------------------------------------------------------------------------------

    def start(self) -> str | None:
        if not self.dataset.value:
            self._error("Choose a dataset first (scan some sources in the Scan tab).")
            return None
        try:
            settings = self.settings()
            launch = self.launch_settings()
            # the preview resolves "auto" against this model and dataset (remembered, so usually instant): a
            # schedule it cannot make (warmup longer than the run...) is refused here, not in a failed run
            self.service.preview(self.dataset.value, self.model.value, settings, processes=launch.process_count)
            run_id = self.service.start(self.dataset.value, self.model.value, settings, launch=launch)
        except (SettingsError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
            self._error(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            return None
        self._pending = None
        memory = (self.service.settings(run_id).get("launch") or {}).get("memory") or {}
        self._info(f"Started run {run_id}." + (f" {memory['message']}" if "switched" in memory.get("message", "")
                                               else ""))
        self._runs_key = None
        self.refresh(select=run_id)
        return run_id

    def stop(self) -> None:
        run_id = self.runs.value
        if not run_id:
            return
        try:
            self.service.stop(run_id)
        except (RuntimeError, FileNotFoundError) as e:
            self._error(str(e))
            return
        self._info(f"Stopping {run_id}: it saves a checkpoint at the next step...")
        self._pending = (run_id, ("stopped", "finished", "failed"), "Run {run_id} {state} at step {step}.")
        self.refresh()

    def resume(self) -> None:
        run_id = self.runs.value
        if not run_id:
            return
        try:
            self.service.resume(run_id)
        except (RuntimeError, FileNotFoundError) as e:
            self._error(str(e))
            return
        self._info(f"Resuming {run_id} from its last checkpoint...")
        self._pending = (run_id, ("running", "stopped", "finished", "failed"), "Run {run_id} {state} (step {step}).")
        self._drawn_key = None
        self.refresh()

    # --- the run view ---------------------------------------------------------------------------------------

    def _run_selected(self, change) -> None:
        if not self._updating_runs:
            self._drawn_key = None
            self.refresh_run()

    def refresh(self, select: str | None = None) -> None:
        """Re-read the run list and the selected run."""
        with self._lock:
            runs = self.service.runs()
            options = []
            for st in runs:
                best = st.get("best")
                label = (f"{st['run_id']} · {st['state']} · {st.get('step') or 0}/{st.get('total') or '?'}"
                         + (f" · best {best['checkpoint']} ({best['test_loss']:.3f})" if best else ""))
                options.append((label, st["run_id"]))
            key = tuple(options)
            if key != self._runs_key:
                keep = select or self.runs.value or (options[0][1] if options else None)
                self._updating_runs = True
                try:
                    self.runs.options = options
                    self.runs.value = keep if keep in [v for _, v in options] else (options[0][1] if options else None)
                finally:
                    self._updating_runs = False
                self._runs_key = key
                self._drawn_key = None if select else self._drawn_key
            self.refresh_run()

    def refresh_run(self) -> None:
        with self._lock:
            run_id = self.runs.value
            if not run_id:
                self.stop_button.disabled = self.resume_button.disabled = True
                self.progress_text.value = "<i>no run yet</i>"
                self.plot_caption.value = ""
                return
            status = self.service.status(run_id)
            state = status.get("state")
            self.stop_button.disabled = state not in ACTIVE
            self.resume_button.disabled = state not in ("stopped", "failed")
            step, total = status.get("step") or 0, status.get("total") or 0
            self.progress.max = max(1, total)
            self.progress.value = min(step, self.progress.max)
            self.progress.bar_style = {"finished": "success", "failed": "danger", "stopped": "warning"}.get(state, "")
            parts = [f"<b>{html.escape(str(state))}</b>", f"step {step:,}/{total:,}" if total else f"step {step}"]
            if state in ACTIVE:
                parts.append(f"ETA {_fmt_eta(status.get('eta_s'))}")
            if (status.get("world_size") or 1) > 1:
                parts.append(html.escape(status.get("launch") or f"{status['world_size']} processes"))
            if status.get("tokens_per_s"):
                parts.append(f"{status['tokens_per_s']:,.0f} tokens/s")
            if state not in ACTIVE and status.get("stop_reason"):
                parts.append(f"<span class='refact-lab-stop-reason'>{html.escape(status['stop_reason'])}</span>")
            elif state == "finished" and status.get("total") and step >= status["total"]:
                parts.append("<span class='refact-lab-stop-reason'>ran all its steps</span>")
            if status.get("error"):
                parts.append(f"<span style='color:#b00'>{html.escape(status['error'])}</span>")
            for note in status.get("notes") or []:
                parts.append(f"<span style='color:#a60'>{html.escape(note)}</span>")
            self.progress_text.value = " · ".join(parts)
            self._settle_message(run_id, status)

            try:
                metrics = self.service.metrics(run_id)
                key = (run_id, len(metrics), state)
                if key != self._drawn_key:
                    self._draw(metrics, run_id)
                    self._draw_checkpoints(self.service.checkpoints(run_id))
                    self._drawn_key = key
                tail = self.service.log_tail(run_id, LOG_LINES)
            except (ValueError, OSError) as e:
                # a damaged or vanished run folder (its status already says so above): shown, not raised
                self.checkpoints.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
                self._drawn_key = None
                tail = ""
            # column-reverse anchors the scroll position at the bottom: the box opens on the newest lines. The
            # pre must not shrink (JupyterLab's CSS gives pre its own scrollbar, anchored at its top).
            self.log.value = ("<div class='refact-lab-log-box' style='max-height:260px;overflow:auto;display:flex;"
                              "flex-direction:column-reverse;background:#f7f7f7'><pre style='margin:0;"
                              "flex-shrink:0;overflow:visible;font-size:85%;padding:4px'>"
                              f"{html.escape(tail)}</pre></div>")

    def _settle_message(self, run_id: str, status: dict) -> None:
        """Replace an in-progress message once the run it is about has reached the state it waited for."""
        if self._pending is None:
            return
        pending_run, states, then = self._pending
        if pending_run == run_id and status.get("state") in states:
            self._pending = None
            text = then.format(run_id=run_id, state=status["state"], step=status.get("step") or 0)
            if status.get("error"):
                self._error(f"{text} {status['error']}")
            else:
                self._info(text)

    def _draw(self, metrics: list[dict], run_id: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "train" and "loss" in m]
        test = [(m["step"], m["test_loss"]) for m in metrics if m.get("kind") == "test" and "test_loss" in m]
        # A Figure without pyplot: no global figure registry, safe from the polling thread.
        fig = Figure(figsize=(7.5, 3.2), dpi=90)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if train:
            ax.plot(*zip(*train), color="#1f77b4", linewidth=1, alpha=0.8, label="train loss")
        if test:
            ax.plot(*zip(*test), color="#d62728", marker="o", markersize=4, linewidth=1.5, label="test loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(run_id, fontsize=9)
        ax.grid(alpha=0.3)
        if train or test:
            ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        # Setting `outputs` (instead of `with output:`) works from any thread and replaces the old picture.
        self.plot.outputs = ({"output_type": "display_data", "metadata": {},
                              "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                                       "text/plain": f"loss plot of {run_id}"}},)
        best = min(test, key=lambda p: p[1]) if test else None
        self.plot_caption.value = (
            f"<span class='train-points' data-n='{len(train)}'>train loss: {len(train)} points</span> · "
            f"<span class='test-points' data-n='{len(test)}'>test loss: {len(test)} points</span>"
            + (f" · lowest test loss {best[1]:.4f} at step {best[0]}" if best else ""))

    def _draw_checkpoints(self, checkpoints: list[dict]) -> None:
        if not checkpoints:
            self.checkpoints.value = "<i>no checkpoint yet</i>"
            return
        rows = []
        for c in checkpoints:
            loss = "-" if c["test_loss"] is None else f"{c['test_loss']:.4f}"
            mark = "<b>★ best</b>" if c["best"] else ""
            rows.append(f"<tr class='{'best' if c['best'] else ''}'><td>{html.escape(c['name'])}</td>"
                        f"<td style='text-align:right'>{c['step']}</td><td style='text-align:right'>{loss}</td>"
                        f"<td>{mark}</td></tr>")
        self.checkpoints.value = ("<table><tr><th>checkpoint</th><th>step</th><th>test loss</th><th></th></tr>"
                                  + "".join(rows) + "</table>")

    # --- polling ------------------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        ticks = 0
        while not self._stop.wait(self.poll_s):
            try:
                ticks += 1
                if ticks % 10 == 0:
                    self.reload_choices()
                if self._pending and self._pending[0] != self.runs.value:
                    # the message is about a run no longer shown: settle it from that run's status
                    self._settle_message(self._pending[0], self.service.status(self._pending[0]))
                if self._preview_due:
                    self.update_preview()
                self.refresh()
            except Exception as e:  # noqa: BLE001 - a transient read error must not kill the live view
                self.last_error = f"refresh failed: {e}"
                time.sleep(self.poll_s)

    def close(self) -> None:
        self._stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is not None:
            self._thread.join(timeout=5)
