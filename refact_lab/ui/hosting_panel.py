"""The Model hosting panel: a view over `refact_lab.serve.hosting.HostingService`.

Pick the base model (the embedded demo model, a registry/hub model or a local folder) and where it runs
(CPU, one GPU, sharded over all GPUs, or a share of one GPU), load it, and watch its state (loading, ready,
failed with the reason) and memory. Below it, the hosting list: every model the server hosts at once with its
state, placement and memory, a load / unload / remove button per entry, and a form to host another model.
Optionally save an OpenAI key (GPT models are then offered and proxied) or the URL of another OpenAI-compatible
engine. The choice is saved by the service; the server's engine loads it.
A background thread refreshes the state after an action until the engine settles. No file I/O or torch here.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from refact_lab.serve.hosting import DEMO_NOTE, DEVICE_CHOICES, HostingService
from refact_lab.serve.state import ROLES

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
    step = snap.get("decode_step") or {}
    if step.get("path"):
        words = {"compiled": "compiled", "lean": "lean (eager)", "transformers": "transformers' forward"}
        text = f"decode step: {words.get(step['path'], step['path'])}"
        if step.get("compile_seconds") is not None:
            text += f", compile warm-up {step['compile_seconds']} s at load"
        if step.get("compile_error"):
            text += f" <span style='color:#cf222e'>(not compiled: {html.escape(step['compile_error'])})</span>"
        rows.append(text)
    twin = snap.get("bf16_twin") or {}
    if twin:
        runs = [f"decode steps of {twin['min_rows']}+ rows" if twin.get("min_rows") else "",
                f"prompts of {twin['min_tokens']}+ tokens" if twin.get("min_tokens") else ""]
        rows.append(f"bf16 copy ({_mb(twin.get('mib'))}): runs {' and '.join(r for r in runs if r)}, where this CPU "
                    f"measured bf16 faster at load ({twin.get('passes')} passes so far); the KV cache stays "
                    f"{html.escape(str(snap.get('dtype')))}")
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


def render_hosted(row: dict) -> str:
    """One entry of the hosting list as HTML: name, state, placement, dtype, role, memory, error."""
    state = row.get("state", "?")
    color = {"ready": "#1a7f37", "loading": "#9a6700", "starting": "#9a6700", "failed": "#cf222e"}.get(state, "#555")
    parts = [f"<code class='refact-lab-hosted-name'>{html.escape(str(row['name']))}</code>",
             f"<b style='color:{color}' class='refact-lab-hosted-state'>{html.escape(str(state))}</b>",
             html.escape(str(row.get("placement"))) + (f" ({html.escape(str(row['device']))})"
                                                       if row.get("device") else ""),
             html.escape(str(row.get("dtype"))), f"role: {html.escape(str(row.get('role')))}",
             f"weights {_mb(row.get('weights_mb'))}"]
    if str(row.get("placement", "")).startswith("share:"):
        parts.append(f"share {row.get('memory_share', 1.0):.0%}")
    if row.get("model") != row.get("name"):
        parts.append(f"<span style='color:#777'>{html.escape(str(row.get('model')))}</span>")
    if row.get("error"):
        parts.append(f"<span style='color:#cf222e'>{html.escape(str(row['error']))}</span>")
    return " · ".join(parts)


class HostingPanel:
    def __init__(self, service: HostingService, poll_s: float = 0.5):
        self.service = service
        self.poll_s = poll_s
        self._poller: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
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

        # the hosting list: several models at once
        self.hosted_rows = w.VBox()
        self.hosted_rows.add_class("refact-lab-hosted")
        self.hosted_buttons: dict[str, list] = {}   # entry name -> its buttons (load/unload, remove)
        self.add_model = w.Text(placeholder="registry name, hub id or folder", description="model", style=style,
                                layout=w.Layout(width="520px"))
        self.add_name = w.Text(placeholder="(the model's name)", description="name", style=style)
        self.add_placement = w.Text(value="auto", description="placement", style=style,
                                    tooltip="auto, cpu, gpu:N, shard:N,M or share:N")
        self.add_dtype = w.Dropdown(options=list(specs["dtype"]["choices"]), value="auto", description="dtype",
                                    style=style)
        self.add_role = w.Dropdown(options=list(ROLES), value="none", description="role", style=style)
        self.add_share = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="memory share",
                                       style=style)
        self.add_button = w.Button(description="Host it", icon="plus")
        self.add_button.on_click(lambda _: self.add_hosted())

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
            w.HTML("<h4>Several models at once</h4><p style='max-width:900px'>The model above is the first one. "
                   "Host others beside it, each on its own devices (a GPU, a shard over several, or a memory "
                   "share of one); requests pick one by its name in their <code>model</code> field, and the "
                   "roles make one the default for completions and one for chat.</p>"),
            self.hosted_rows, self.add_model, w.HBox([self.add_name, self.add_placement]),
            w.HBox([self.add_dtype, self.add_role]), self.add_share, self.add_button,
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
        # one at a time: the background watcher's older read must not be drawn over a newer one
        with self._refresh_lock:
            snap = self.service.status()
            self.state.value = render_state(snap)
            self._show_hosted(self.service.hosted(snap))
            return snap

    def _show_hosted(self, rows: list[dict]) -> None:
        children, buttons_of = [], {}   # built aside, then swapped in whole (a watcher thread redraws too)
        for row in rows:
            buttons = []
            if row.get("source") == "hosted":
                toggle = w.Button(description="Unload" if row.get("loaded") else "Load",
                                  icon="stop" if row.get("loaded") else "play")
                toggle.on_click(lambda _, n=row["name"], on=not row.get("loaded"): self.set_loaded(n, on))
                remove = w.Button(description="Remove", icon="trash", button_style="danger")
                remove.on_click(lambda _, n=row["name"]: self.remove_hosted(n))
                buttons = [toggle, remove]
            buttons_of[row["name"]] = buttons
            children.append(w.HBox([w.HTML(render_hosted(row)), *buttons]))
        self.hosted_buttons = buttons_of
        self.hosted_rows.children = children

    def _error(self, e: Exception) -> None:
        self.message.value = f"<span style='color:#cf222e'>{html.escape(str(e))}</span>"

    def add_hosted(self) -> None:
        try:
            entry = self.service.add_hosted(self.add_model.value, self.add_name.value or None,
                                            self.add_placement.value.strip(), self.add_dtype.value,
                                            self.add_role.value, self.add_share.value)
        except (ValueError, TypeError) as e:
            self._error(e)
            return
        self.message.value = (f"Hosting <code>{html.escape(entry['name'])}</code> on "
                              f"{html.escape(entry['placement'])}: the server loads it now.")
        self.refresh()
        self.watch()

    def set_loaded(self, name: str, loaded: bool) -> None:
        try:
            self.service.set_loaded(name, loaded)
        except ValueError as e:
            self._error(e)
            return
        self.message.value = f"<code>{html.escape(name)}</code>: {'loading' if loaded else 'unloaded'}."
        self.refresh()
        self.watch()

    def remove_hosted(self, name: str) -> None:
        try:
            self.service.remove_hosted(name)
        except ValueError as e:
            self._error(e)
            return
        self.message.value = f"<code>{html.escape(name)}</code> removed; its requests in flight finish first."
        self.refresh()

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
                busy = any(r.get("state") in ("starting", "loading", "stopping") for r in snap.get("hosted") or [])
                if settled and not busy and applied == self.service.current()["model"]:
                    return

        self._poller = threading.Thread(target=run, daemon=True, name="hosting-panel-refresh")
        self._poller.start()
