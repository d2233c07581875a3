"""The Model hosting panel: a view over `refact_lab.serve.hosting.HostingService`.

Pick the base model (the embedded demo model, a registry/hub model or a local folder) and where it runs
(CPU, one GPU, sharded over all GPUs, or a share of one GPU), load it, and watch its state (loading, ready,
failed with the reason) and memory. Optionally save an OpenAI key (GPT models are then offered and proxied) or
the URL of another OpenAI-compatible engine. The choice is saved by the service; the server's engine loads it.
A background thread refreshes the state after an action until the engine settles. No file I/O or torch here.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from refact_lab.serve.hosting import DEMO_NOTE, DEVICE_CHOICES, HostingService

OTHER = "other: hub id or local folder"


def _mb(value) -> str:
    return "-" if value is None else (f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB")


def render_state(snap: dict) -> str:
    """The engine snapshot as HTML (state first, then where, how much memory, what is served)."""
    state = snap.get("state", "?")
    color = {"ready": "#1a7f37", "loading": "#9a6700", "failed": "#cf222e"}.get(state, "#555")
    rows = [f"<b style='color:{color}' class='refact-lab-model-state'>{html.escape(state)}</b>"]
    if snap.get("error"):
        rows.append(f"<span style='color:#cf222e'>reason: {html.escape(str(snap['error']))}</span>")
    if snap.get("note"):
        rows.append(f"<i>{html.escape(snap['note'])}</i>")
    if snap.get("model"):
        rows.append(f"model: <code>{html.escape(str(snap['model']))}</code>"
                    + (f" ({html.escape(str(snap['source']))})" if snap.get("source") else ""))
    if snap.get("device"):
        rows.append(f"device: {html.escape(str(snap['device']))}, dtype: {html.escape(str(snap.get('dtype')))}, "
                    f"context: {snap.get('n_ctx')} tokens"
                    + (f", loaded in {snap['load_seconds']} s" if snap.get("load_seconds") else ""))
    mem = snap.get("memory") or {}
    if mem:
        parts = [f"weights {_mb(mem.get('weights_mb'))}", f"process {_mb(mem.get('process_rss_mb'))}"]
        for g in mem.get("gpus", []):
            parts.append(f"{g['device']} {_mb(g['allocated_mb'])} of {_mb(g['total_mb'])}")
        rows.append("memory: " + ", ".join(parts))
    if snap.get("models"):
        rows.append("serving: " + ", ".join(f"<code>{html.escape(m)}</code>" for m in snap["models"]))
    ups = [u for u in snap.get("upstreams") or []]
    for u in ups:
        rows.append(f"upstream {html.escape(u['name'])}: {len(u['models'])} models"
                    + (f" <span style='color:#cf222e'>({html.escape(u['error'])})</span>" if u.get("error") else ""))
    return "<br>".join(rows)


class HostingPanel:
    def __init__(self, service: HostingService, poll_s: float = 0.5):
        self.service = service
        self.poll_s = poll_s
        self._poller: threading.Thread | None = None
        current = service.current()
        specs = service.setting_specs()
        style = {"description_width": "110px"}
        options = [(f"{o.name} — {o.description}", o.name) for o in service.options()] + [(OTHER, OTHER)]
        known = {o.name for o in service.options()}
        self.model = w.Dropdown(options=options, value=current["model"] if current["model"] in known else OTHER,
                                description="base model", style=style, layout=w.Layout(width="640px"))
        self.custom = w.Text(value="" if current["model"] in known else current["model"],
                             placeholder="Qwen/Qwen2.5-Coder-1.5B or /path/to/model-folder",
                             description="hub id / folder", style=style, layout=w.Layout(width="640px"))
        self.device = w.Dropdown(options=list(dict.fromkeys([*DEVICE_CHOICES, current["device"]])),
                                 value=current["device"], description="device", style=style,
                                 tooltip=specs["device"]["help"])
        self.dtype = w.Dropdown(options=list(specs["dtype"]["choices"]), value=current["dtype"], description="dtype",
                                style=style, tooltip=specs["dtype"]["help"])
        frac = specs["gpu_memory_fraction"]
        self.gpu_share = w.FloatSlider(value=current["gpu_memory_fraction"], min=frac["min"], max=frac["max"],
                                       step=0.05, description="GPU share", style=style, tooltip=frac["help"])
        self.loop_guard = w.Checkbox(value=current["loop_guard"], description="cut completions that loop",
                                     indent=False, tooltip=specs["loop_guard"]["help"])
        self.loop_guard.observe(lambda ch: self.service.set_loop_guard(ch["new"]), "value")
        self.load_button = w.Button(description="Load model", button_style="primary", icon="play")
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.message = w.HTML()
        self.state = w.HTML()
        self.state.add_class("refact-lab-hosting-state")
        self.load_button.on_click(lambda _: self.load())
        self.refresh_button.on_click(lambda _: self.refresh())
        self.model.observe(lambda ch: setattr(self.custom, "disabled", ch["new"] != OTHER), "value")
        self.custom.disabled = self.model.value != OTHER

        self.openai_key = w.Password(placeholder="sk-... (checked with OpenAI, saved in settings.json 0600)",
                                     description="OpenAI key", style=style, layout=w.Layout(width="520px"))
        self.key_state = w.HTML()
        self.key_state.add_class("refact-lab-openai-key-state")
        self.remove_key_button = w.Button(description="Remove key", icon="trash", button_style="danger")
        self.remove_key_button.add_class("refact-lab-openai-key-remove")
        self.remove_key_button.on_click(lambda _: self.remove_openai_key())
        up = service.upstream()
        self.upstream_url = w.Text(value=up["upstream_url"] or "", placeholder="http://host:8000/v1 (vLLM, ...)",
                                   description="engine URL", style=style, layout=w.Layout(width="520px"))
        self.upstream_key = w.Password(description="engine key", style=style, layout=w.Layout(width="520px"))
        self.save_upstream_button = w.Button(description="Save", icon="save")
        self.save_upstream_button.on_click(lambda _: self.save_upstreams())

        self.widget = w.VBox([
            w.HTML("<h3>Model hosting</h3>"
                   f"<p style='max-width:900px' class='refact-lab-demo-note'>{html.escape(DEMO_NOTE)}</p>"),
            self.model, self.custom, w.HBox([self.device, self.dtype]), self.gpu_share, self.loop_guard,
            w.HBox([self.load_button, self.refresh_button]), self.message, self.state,
            w.HTML("<h4>OpenAI models and other engines (optional)</h4>"
                   "<p style='max-width:900px'>With an OpenAI key, GPT models are listed by the server and chat "
                   "requests for them are forwarded to OpenAI. An engine URL fronts any OpenAI-compatible server "
                   "(e.g. vLLM with LoRA modules) through this one.</p>"),
            self.openai_key, w.HBox([self.key_state, self.remove_key_button]), self.upstream_url, self.upstream_key,
            self.save_upstream_button,
        ])
        self.widget.add_class("refact-lab-hosting")
        self._show_key_state()
        self.refresh()

    def chosen_model(self) -> str:
        return self.custom.value.strip() if self.model.value == OTHER else self.model.value

    def load(self) -> None:
        try:
            self.service.choose(self.chosen_model(), self.device.value, self.dtype.value, self.gpu_share.value)
        except (ValueError, TypeError) as e:
            self.message.value = f"<span style='color:#cf222e'>{html.escape(str(e))}</span>"
            return
        self.message.value = (f"Saved: <code>{html.escape(self.chosen_model())}</code> on {self.device.value}. "
                              "The server loads it now; requests wait until it is ready.")
        self.watch()

    def _show_key_state(self) -> None:
        up = self.service.upstream()
        if up["openai_key_set"]:
            self.key_state.value = (f"A key is stored (<code>{html.escape(up['openai_key_hint'])}</code>): GPT "
                                    "models are offered. Type a new one to replace it.")
        else:
            self.key_state.value = "<span style='color:#777'>No OpenAI key stored.</span>"
        self.remove_key_button.layout.display = "" if up["openai_key_set"] else "none"

    def save_upstreams(self) -> None:
        key, news = self.openai_key.value.strip(), []
        try:
            if key:
                check = self.service.check_openai_key(key)  # a malformed key: ValueError before any request
                if check["ok"] is False:
                    raise ValueError(f"Not saved: {check['reason']}")
                self.service.set_openai_key(key)
                news.append(f"OpenAI key saved and accepted ({check['models']} models)." if check["ok"]
                            else f"OpenAI key saved; {check['reason']}.")
            self.service.set_upstream(self.upstream_url.value, self.upstream_key.value or None)
        except ValueError as e:
            self.message.value = f"<span style='color:#cf222e'>{html.escape(str(e))}</span>"
            return
        finally:
            self._show_key_state()
        self.openai_key.value = self.upstream_key.value = ""
        news.append("Saved. The server lists the upstream models within a second.")
        self.message.value = html.escape(" ".join(news))
        self.watch(timeout=5)

    def remove_openai_key(self) -> None:
        self.service.set_openai_key(None)
        self._show_key_state()
        self.message.value = "OpenAI key removed: GPT models are no longer offered."

    def refresh(self) -> dict:
        snap = self.service.status()
        self.state.value = render_state(snap)
        return snap

    def watch(self, timeout: float = 600) -> None:
        """Refresh in the background until the engine settles (ready or failed) or `timeout` passes."""
        if self._poller is not None and self._poller.is_alive():
            return

        def run():
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(self.poll_s)
                snap = self.refresh()
                applied = (snap.get("applied") or {}).get("model")
                settled = snap.get("state") in ("ready", "failed", "unreachable")
                if settled and applied == self.service.current()["model"]:
                    return

        self._poller = threading.Thread(target=run, daemon=True, name="hosting-panel-refresh")
        self._poller.start()
