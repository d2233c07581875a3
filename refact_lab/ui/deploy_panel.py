"""The Deploy panel: a view over `refact_lab.serve.deploy.DeployService`.

Choose which LoRA checkpoint the server offers (best of the latest run, latest, a specific run and checkpoint,
or off) and deploy it without a restart; try completions at a cursor with the base model and the fine-tuned one
side by side (after the engine applied the last deploy, with each one's time in ms); copy the inference URL,
the token and ready-made settings for the Refact plugin, Continue and Tabby. Buttons call the service; a
background thread refreshes the status until the server has applied a change. Refresh (and opening the tab)
re-reads the runs and checkpoints; a message is cleared once it no longer describes the server's state.
No file I/O or torch here.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from refact_lab.serve.deploy import DeployService
from refact_lab.serve.state import LoraChoice

MODES = [("Best checkpoint of the latest run", "best"), ("Latest checkpoint of the latest run", "latest"),
         ("A specific checkpoint", "checkpoint"), ("Off: the base model only", "off")]


def _pre(text: str | None, cls: str) -> str:
    body = "(no fine-tuned model deployed)" if text is None else html.escape(text)
    style = "white-space:pre-wrap;min-height:3em;background:#f6f8fa;padding:6px"
    return f"<pre class='{cls}' style='{style}'>{body}</pre>"


def _snippets_html(snippets: list[dict]) -> str:
    """The repository context a playground completion saw: each snippet's path, its text folded away."""
    if not snippets:
        return ("<span class='refact-lab-playground-snippets'>repository context: none in this prompt (off, no "
                "index for the project, or nothing matched)</span>")
    items = "".join(
        f"<details><summary><code class='refact-lab-snippet-path'>{html.escape(s['path'])}</code> "
        f"({len(s['text'].splitlines())} lines)</summary><pre style='background:#f6f8fa;padding:6px;"
        f"max-height:16em;overflow:auto'>{html.escape(s['text'])}</pre></details>" for s in snippets)
    return (f"<div class='refact-lab-playground-snippets'><b>repository context in the prompt</b>: "
            f"{len(snippets)} snippet{'s' if len(snippets) != 1 else ''}{items}</div>")


def _head(title: str, model: str | None, ms: float | None) -> str:
    timing = f" · <span class='refact-lab-playground-ms'>{ms:.0f} ms</span>" if ms is not None else ""
    name = f" <code>{html.escape(model)}</code>" if model else ""
    return f"<b>{title}</b>{name}{timing}"


class DeployPanel:
    def __init__(self, service: DeployService, poll_s: float = 0.3):
        self.service = service
        self.poll_s = poll_s
        self._poller: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._runs: dict = {}
        self._message_valid = None   # while it returns True the message still describes the state
        self._reloading = False      # the lists are being refilled: selection changes are not the user's
        style = {"description_width": "90px"}
        choice = service.choice()
        self.mode = w.RadioButtons(options=MODES, value=choice.mode, description="checkpoint", style=style)
        self.run = w.Dropdown(description="run", style=style, layout=w.Layout(width="420px"))
        self.checkpoint = w.Dropdown(description="step", style=style, layout=w.Layout(width="420px"))
        self.run.add_class("refact-lab-deploy-run")
        self.checkpoint.add_class("refact-lab-deploy-checkpoint")
        self.deploy_button = w.Button(description="Deploy", button_style="primary", icon="rocket")
        self.deploy_button.add_class("refact-lab-deploy-button")
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.refresh_button.add_class("refact-lab-deploy-refresh")
        self.message = w.HTML()
        self.message.add_class("refact-lab-deploy-message")
        self.state = w.HTML()
        self.state.add_class("refact-lab-deploy-state")
        self.deploy_button.on_click(lambda _: self.deploy())
        self.refresh_button.on_click(lambda _: self.refresh(runs=True, clear=True))

        self.prefix = w.Textarea(value="def fibonacci(n):\n    ", description="before cursor", style=style,
                                 layout=w.Layout(width="640px", height="120px"))
        self.suffix = w.Textarea(value="\n\nprint(fibonacci(10))\n", description="after cursor", style=style,
                                 layout=w.Layout(width="640px", height="70px"))
        self.max_tokens = w.IntSlider(value=32, min=1, max=256, description="max tokens", style=style)
        self.single_line = w.Checkbox(value=False, description="single line", indent=False)
        self.complete_button = w.Button(description="Complete", icon="play")
        self.complete_button.add_class("refact-lab-playground-button")
        self.base_head = w.HTML("<b>base model</b>")
        self.lora_head = w.HTML("<b>fine-tuned</b>")
        self.base_head.add_class("refact-lab-playground-base-head")
        self.lora_head.add_class("refact-lab-playground-lora-head")
        self.base_out = w.HTML(_pre("", "refact-lab-playground-base"))
        self.lora_out = w.HTML(_pre(None, "refact-lab-playground-lora"))
        self.snippets_out = w.HTML()
        self.complete_button.on_click(lambda _: self._in_background(self.complete))

        self.connection = w.HTML()
        self.connection.add_class("refact-lab-connection")
        self.export_format = w.Dropdown(options=[("PEFT adapter (vLLM --lora-modules, PeftModel)", "peft"),
                                                 ("Merged model (transformers, GGUF conversion)", "merged")],
                                        value="peft", description="export as", style=style,
                                        layout=w.Layout(width="420px"))
        self.export_link = w.HTML()
        self.export_link.add_class("refact-lab-export-link")

        # repository context: which project's index gives FIM prompts snippets of other files, and its budget
        now = service.summary()
        options = self._context_options()
        if now["context_choice"] not in [v for _, v in options]:   # a project removed since it was chosen
            options.append((now["context_choice"], now["context_choice"]))
        self.context = w.Dropdown(options=options, value=now["context_choice"],
                                  description="context", style=style, layout=w.Layout(width="420px"))
        self.context_tokens = w.BoundedIntText(value=now["context_tokens"], min=0, max=32768, step=128,
                                               description="budget", style=style, layout=w.Layout(width="220px"))
        self.context_button = w.Button(description="Save context", icon="save")
        self.context_message = w.HTML(self._context_line(now))
        for widget, cls in ((self.context, "refact-lab-context-project"), (self.context_tokens,
                            "refact-lab-context-tokens"), (self.context_button, "refact-lab-context-button"),
                            (self.context_message, "refact-lab-context-message")):
            widget.add_class(cls)
        self.context_button.on_click(lambda _: self.save_context())

        self.widget = w.VBox([
            w.HTML("<h3>Deploy</h3><p>Which fine-tuned checkpoint the server offers as "
                   "<code>&lt;base&gt;:lora</code>. A change takes effect without a restart; completions already "
                   "running finish on the checkpoint they started with.</p>"),
            self.mode, self.run, self.checkpoint, w.HBox([self.deploy_button, self.refresh_button]),
            self.message, self.state,
            w.HTML("<h4>Repository context</h4><p>FIM completions get snippets of other files of a project "
                   "(retrieved from its scan's index, never the file being edited) within a token budget; "
                   "applied to the next request, no restart.</p>"),
            w.HBox([self.context, self.context_tokens, self.context_button]), self.context_message,
            w.HTML("<h4>Playground</h4>"),
            self.prefix, self.suffix, w.HBox([self.max_tokens, self.single_line, self.complete_button]),
            w.HBox([w.VBox([self.base_head, self.base_out], layout=w.Layout(width="50%")),
                    w.VBox([self.lora_head, self.lora_out], layout=w.Layout(width="50%"))]),
            self.snippets_out,
            w.HTML("<h4>Connect your IDE</h4>"), self.connection,
            w.HTML("<h4>Export</h4><p>The step chosen above, with a card (base model, sources, files, scores), "
                   "to back it up or serve it elsewhere.</p>"),
            w.HBox([self.export_format, self.export_link]),
        ])
        self.widget.add_class("refact-lab-deploy")
        self.reload_runs(choice)
        # after the lists are filled, so filling them does not count as the user changing the selection
        for widget in (self.mode, self.run, self.checkpoint):
            widget.observe(self._on_selection, "value")
        for widget in (self.run, self.checkpoint, self.export_format):
            widget.observe(lambda _: self._show_export_link(), "value")
        self._show_export_link()
        self.refresh()

    # ---- messages ------------------------------------------------------------------------------------------

    def _say(self, text: str, color: str = "#555", valid=None) -> None:
        """Show a message; `valid(snap)` says whether it still describes the server (refresh clears it when not)."""
        self.message.value = f"<span style='color:{color}'>{html.escape(text)}</span>" if text else ""
        self._message_valid = valid

    def _on_selection(self, change) -> None:
        if change["owner"] is self.mode:
            self._sync_enabled()
        elif change["owner"] is self.run:
            self._fill_checkpoints()
        if not self._reloading and (self._poller is None or not self._poller.is_alive()):
            self._say("")  # the user picked something else: a message about the previous pick no longer applies

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def reload_runs(self, choice: LoraChoice | None = None) -> None:
        """Re-read the runs and their checkpoints; keep the selection when it still exists (else the choice
        deployed, else the newest run and its best or newest checkpoint)."""
        keep_run, keep_ckpt = self.run.value, self.checkpoint.value
        if choice is not None and choice.run_id:
            keep_run, keep_ckpt = choice.run_id, choice.checkpoint
        self._runs = {r.run_id: r for r in self.service.runs()}
        options = [(f"{r.run_id} ({r.state}, {len(r.checkpoints)} checkpoints)", r.run_id)
                   for r in self._runs.values()]
        self._reloading = True
        try:
            if list(self.run.options) != options:
                self.run.options = options   # resets the value: set it again below
            self.run.value = keep_run if keep_run in self._runs else (options[0][1] if options else None)
            self._fill_checkpoints(keep_ckpt)
        finally:
            self._reloading = False
        self._sync_enabled()

    def _fill_checkpoints(self, keep: str | None = None) -> None:
        keep = keep or self.checkpoint.value
        run = self._runs.get(self.run.value)
        options = []
        for c in (run.checkpoints if run else ()):
            loss = f", test loss {c.test_loss:.4f}" if c.test_loss is not None else ""
            best = f" ★ best by {run.best_by.replace('_', ' ')}" if run.best == c.name else ""
            options.append((f"{c.name}{loss}{best}", c.name))
        if list(self.checkpoint.options) != options:
            self.checkpoint.options = options
        names = [v for _, v in options]
        # never leave the step empty: the kept one, else the run's best, else its newest
        default = run.best if run and run.best in names else (names[-1] if names else None)
        self.checkpoint.value = keep if keep in names else default

    def _show_export_link(self) -> None:
        if not (self.run.value and self.checkpoint.value):
            self.export_link.value = "<i>no checkpoint to export yet</i>"
            return
        href = html.escape(self.service.export_path(self.run.value, self.checkpoint.value, self.export_format.value))
        label = html.escape(f"Download {self.run.value}/{self.checkpoint.value} (.zip)")
        self.export_link.value = f"<a href='{href}' download target='_blank'>{label}</a>"

    def _sync_enabled(self) -> None:
        specific = self.mode.value == "checkpoint"
        self.run.disabled = self.checkpoint.disabled = not specific

    def selected_choice(self) -> LoraChoice:
        if self.mode.value == "checkpoint":
            return LoraChoice("checkpoint", self.run.value, self.checkpoint.value)
        return LoraChoice(self.mode.value)

    def deploy(self) -> None:
        try:
            choice = self.service.deploy(self.selected_choice())
        except ValueError as e:
            self._say(f"Not deployed: {e}", "#cf222e")
            return
        wanted = choice.to_dict()
        self._say(f"Deploying {choice.label()}…", valid=lambda snap: (snap.get("lora") or {}).get("applied") != wanted
                  and self.service.choice().to_dict() == wanted)
        self.watch()

    # ---- repository context --------------------------------------------------------------------------------

    def _context_options(self) -> list[tuple[str, str]]:
        return ([("auto: the deployed run's project", "auto"), ("off", "off")]
                + [(p, p) for p in self.service.home.projects()])

    @staticmethod
    def _context_line(summary: dict) -> str:
        project = summary["context"]
        what = "off" if project == "off" else f"{html.escape(project)}, up to {summary['context_tokens']} tokens"
        note = f" <i>({html.escape(summary['context_note'])})</i>" if summary.get("context_note") else ""
        return f"repository context: <code class='refact-lab-context-now'>{what}</code>{note}"

    def save_context(self) -> None:
        """Save the context choice through the deploy service (as `refact-lab deploy --context` does)."""
        try:
            self.service.set_context(self.context.value, self.context_tokens.value)
        except ValueError as e:
            self.context_message.value = f"<span style='color:#cf222e'>Not saved: {html.escape(str(e))}</span>"
            return
        self.context_message.value = self._context_line(self.service.summary())

    # ---- status --------------------------------------------------------------------------------------------

    def refresh(self, runs: bool = True, clear: bool = False) -> dict:
        """Re-read the server's state and (with `runs`) the runs and checkpoints on disk."""
        if runs:
            self.reload_runs()
        snap = self.service.status()
        lora = snap.get("lora") or {}
        dep = lora.get("deployed")
        rows = [f"server: <b>{html.escape(str(snap.get('state')))}</b>"
                + (f" — {html.escape(str(snap['error']))}" if snap.get("error") else "")]
        rows.append("deployed: " + (f"<code class='refact-lab-deployed'>{html.escape(dep['run_id'])}/"
                                    f"{html.escape(dep['checkpoint'])}</code>" if dep else
                                    "<code class='refact-lab-deployed'>off</code>")
                    + (f" (choice: {html.escape(lora['label'])})" if lora.get("label") else ""))
        if lora.get("error"):
            rows.append(f"<span style='color:#cf222e'>{html.escape(lora['error'])}</span>")
        if snap.get("models"):
            rows.append("models: " + ", ".join(f"<code>{html.escape(m)}</code>" for m in snap["models"]))
        # caps_version is the IDE clients' cache key, not something a user acts on: not shown
        self.state.value = "<br>".join(rows)
        if clear or (self._message_valid is not None and not self._message_valid(snap)):
            self._say("")
        self._render_connection(snap)
        return snap

    def watch(self, timeout: float = 120) -> None:
        """Refresh in the background until the engine has applied the saved choice, then say how it went."""
        if self._poller is not None and self._poller.is_alive():
            return

        def run():
            wanted = self.service.choice()
            deadline = time.monotonic() + timeout
            snap: dict = {}
            while time.monotonic() < deadline:
                time.sleep(self.poll_s)
                snap = self.refresh(runs=False)
                lora = snap.get("lora") or {}
                if self.service.choice() != wanted:
                    return  # deployed again meanwhile: that deploy's own watch reports
                if lora.get("applied") == wanted.to_dict() or snap.get("state") == "unreachable":
                    break
            else:
                self._say(f"{wanted.label()}: not applied after {timeout:.0f} s (server: {snap.get('state')})",
                          "#cf222e", valid=lambda s: (s.get("lora") or {}).get("applied") != wanted.to_dict())
                return
            lora = snap.get("lora") or {}
            if lora.get("error") or snap.get("state") == "unreachable":
                self._say("")   # the state line shows the reason
                return
            dep = lora.get("deployed")
            what = f"{dep['run_id']}/{dep['checkpoint']}" if dep else "off (the base model only)"
            self._say(f"Deployed: {what}.", "#1a7f37", valid=lambda s: (s.get("lora") or {}).get("deployed") == dep)

        self._poller = threading.Thread(target=run, daemon=True, name="deploy-panel-refresh")
        self._poller.start()

    def on_show(self) -> None:
        """The tab was opened: show the runs, checkpoints and state as they are now."""
        self.refresh()

    # ---- playground and connection -------------------------------------------------------------------------

    def _in_background(self, action) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        self._worker = threading.Thread(target=action, daemon=True, name="deploy-panel-playground")
        self._worker.start()

    def complete(self) -> dict | None:
        """Complete with the base model and the deployed adapter (after the engine applied the last deploy)."""
        self.base_out.value = _pre("…", "refact-lab-playground-base")
        self.lora_out.value = _pre("…", "refact-lab-playground-lora")
        self.snippets_out.value = ""
        self.base_head.value, self.lora_head.value = "<b>base model</b>", "<b>fine-tuned</b>"
        self.complete_button.disabled = True
        try:
            out = self.service.playground(self.prefix.value, self.suffix.value, self.max_tokens.value,
                                          self.single_line.value)
        except Exception as e:  # show the server's reason in the panel
            self.base_out.value = _pre(f"error: {e}", "refact-lab-playground-base")
            self.lora_out.value = _pre(None, "refact-lab-playground-lora")
            return None
        finally:
            self.complete_button.disabled = False
        self.base_head.value = _head("base model", out["base_model"], out["base_ms"])
        self.lora_head.value = _head("fine-tuned", out["lora_model"], out["lora_ms"])
        self.base_out.value = _pre(out["base"], "refact-lab-playground-base")
        self.lora_out.value = _pre(out["lora"], "refact-lab-playground-lora")
        self.snippets_out.value = _snippets_html(out.get("snippets") or [])
        return out

    def _render_connection(self, snap: dict) -> None:
        c = self.service.connection(snap)

        def block(title: str, text: str, cls: str) -> str:
            return (f"<p><b>{title}</b></p><pre class='{cls}' style='background:#f6f8fa;padding:6px;"
                    f"user-select:all'>{html.escape(text)}</pre>")

        self.connection.value = (
            f"<p>Inference URL: <code class='refact-lab-url'>{html.escape(c['url'])}</code> "
            f"(OpenAI base: <code>{html.escape(c['api_base'])}</code>)<br>"
            f"Token: <code class='refact-lab-token'>{html.escape(c['token'] or '(none: --no-auth)')}</code><br>"
            f"Model: <code>{html.escape(c['model'])}</code></p>"
            + block("Refact plugin (VS Code settings.json; JetBrains: the same two fields in its settings)",
                    c["refact"], "refact-lab-snippet-refact")
            + block("Continue", c["continue"], "refact-lab-snippet-continue")
            + block("Tabby", c["tabby"], "refact-lab-snippet-tabby"))
