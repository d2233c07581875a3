"""The Deploy panel: a view over `refact_lab.serve.deploy.DeployService`.

Choose which LoRA checkpoint the server offers (best of the latest run, latest, a specific run and checkpoint,
or off) and deploy it without a restart; try completions at a cursor with the base model and the fine-tuned one
side by side; copy the inference URL, the token and ready-made settings for the Refact plugin, Continue and
Tabby. Buttons call the service; a background thread refreshes the status until the server has applied a
change. No file I/O or torch here.
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


class DeployPanel:
    def __init__(self, service: DeployService, poll_s: float = 0.3):
        self.service = service
        self.poll_s = poll_s
        self._poller: threading.Thread | None = None
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
        self.message = w.HTML()
        self.state = w.HTML()
        self.state.add_class("refact-lab-deploy-state")
        self.mode.observe(lambda _: self._sync_enabled(), "value")
        self.run.observe(lambda _: self._fill_checkpoints(), "value")
        self.deploy_button.on_click(lambda _: self.deploy())
        self.refresh_button.on_click(lambda _: self.refresh())

        self.prefix = w.Textarea(value="def fibonacci(n):\n    ", description="before cursor", style=style,
                                 layout=w.Layout(width="640px", height="120px"))
        self.suffix = w.Textarea(value="\n\nprint(fibonacci(10))\n", description="after cursor", style=style,
                                 layout=w.Layout(width="640px", height="70px"))
        self.max_tokens = w.IntSlider(value=32, min=1, max=256, description="max tokens", style=style)
        self.single_line = w.Checkbox(value=False, description="single line", indent=False)
        self.complete_button = w.Button(description="Complete", icon="play")
        self.complete_button.add_class("refact-lab-playground-button")
        self.base_out = w.HTML(_pre("", "refact-lab-playground-base"))
        self.lora_out = w.HTML(_pre(None, "refact-lab-playground-lora"))
        self.complete_button.on_click(lambda _: self.complete())

        self.connection = w.HTML()
        self.connection.add_class("refact-lab-connection")

        self.widget = w.VBox([
            w.HTML("<h3>Deploy</h3><p>Which fine-tuned checkpoint the server offers as "
                   "<code>&lt;base&gt;:lora</code>. A change takes effect without a restart; completions already "
                   "running finish on the checkpoint they started with.</p>"),
            self.mode, self.run, self.checkpoint, w.HBox([self.deploy_button, self.refresh_button]),
            self.message, self.state,
            w.HTML("<h4>Playground</h4>"),
            self.prefix, self.suffix, w.HBox([self.max_tokens, self.single_line, self.complete_button]),
            w.HBox([w.VBox([w.HTML("<b>base model</b>"), self.base_out], layout=w.Layout(width="50%")),
                    w.VBox([w.HTML("<b>fine-tuned</b>"), self.lora_out], layout=w.Layout(width="50%"))]),
            w.HTML("<h4>Connect your IDE</h4>"), self.connection,
        ])
        self.widget.add_class("refact-lab-deploy")
        self.reload_runs(choice)
        self.refresh()

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def reload_runs(self, choice: LoraChoice | None = None) -> None:
        self._runs = {r.run_id: r for r in self.service.runs()}
        options = [(f"{r.run_id} ({r.state}, {len(r.checkpoints)} checkpoints)", r.run_id)
                   for r in self._runs.values()]
        self.run.options = options
        if choice and choice.run_id in self._runs:
            self.run.value = choice.run_id
        self._fill_checkpoints()
        if choice and choice.checkpoint and choice.checkpoint in [v for _, v in self.checkpoint.options]:
            self.checkpoint.value = choice.checkpoint
        self._sync_enabled()

    def _fill_checkpoints(self) -> None:
        run = self._runs.get(self.run.value)
        options = []
        for c in (run.checkpoints if run else ()):
            loss = f", test loss {c.test_loss:.4f}" if c.test_loss is not None else ""
            best = " ★ best" if run.best == c.name else ""
            options.append((f"{c.name}{loss}{best}", c.name))
        self.checkpoint.options = options

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
            self.message.value = f"<span style='color:#cf222e'>Not deployed: {html.escape(str(e))}</span>"
            return
        self.message.value = f"Deploying {html.escape(choice.label())}…"
        self.watch()

    # ---- status --------------------------------------------------------------------------------------------

    def refresh(self) -> dict:
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
        if snap.get("caps_version") is not None:
            rows.append(f"caps_version: <code class='refact-lab-caps-version'>{snap['caps_version']}</code>")
        self.state.value = "<br>".join(rows)
        self._render_connection(snap)
        return snap

    def watch(self, timeout: float = 120) -> None:
        if self._poller is not None and self._poller.is_alive():
            return

        def run():
            wanted = self.service.choice().to_dict()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(self.poll_s)
                snap = self.refresh()
                if (snap.get("lora") or {}).get("applied") == wanted or snap.get("state") == "unreachable":
                    self.message.value = "Deployed." if not (snap.get("lora") or {}).get("error") else ""
                    return

        self._poller = threading.Thread(target=run, daemon=True, name="deploy-panel-refresh")
        self._poller.start()

    # ---- playground and connection -------------------------------------------------------------------------

    def complete(self) -> dict | None:
        self.base_out.value = _pre("…", "refact-lab-playground-base")
        try:
            out = self.service.playground(self.prefix.value, self.suffix.value, self.max_tokens.value,
                                          self.single_line.value)
        except Exception as e:  # show the server's reason in the panel
            self.base_out.value = _pre(f"error: {e}", "refact-lab-playground-base")
            return None
        self.base_out.value = _pre(out["base"], "refact-lab-playground-base")
        self.lora_out.value = _pre(out["lora"], "refact-lab-playground-lora")
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
