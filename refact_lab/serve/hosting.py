"""Model hosting as a service: which base model is served, where it runs, and what the engine says about it.

The choice (model, device, dtype, GPU share) is validated here with the registry and `ServeSettings`, then
saved in settings.json, where the server's engine picks it up and reloads (see `refact_lab.serve.state`). Live
state, memory and errors come from the engine through an inference client (`refact_lab.serve.client`).
Also keeps the upstream credentials (an OpenAI key, or another OpenAI-compatible engine's URL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from refact_lab.config import ServeSettings, field_specs
from refact_lab.home import Home
from refact_lab.serve.client import default_inference

DEMO_NOTE = ("The embedded default model is a small demo model that ships inside the package and works offline: "
             "good for trying the workflow, weak at real completions. For real use pick a hub model "
             "(Qwen2.5-Coder 0.5B / 1.5B / 7B, StarCoder2, DeepSeek-Coder...) or a local model folder.")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "shard")


@dataclass(frozen=True)
class ModelOption:
    name: str
    source: str
    description: str
    memory_gb: float
    n_ctx: int


class HostingService:
    def __init__(self, home: Home, inference=None):
        self.home = home
        self.inference = inference if inference is not None else default_inference(home)

    def options(self) -> list[ModelOption]:
        from refact_lab.models.registry import KNOWN_MODELS

        return [ModelOption(s.name, s.source, s.description, s.memory_gb, s.n_ctx) for s in KNOWN_MODELS.values()]

    def setting_specs(self) -> dict[str, dict]:
        """Help, bounds and choices of the hosting fields, for forms (from ServeSettings' metadata)."""
        return {s["name"]: s for s in field_specs(ServeSettings)
                if s["name"] in ("device", "dtype", "gpu_memory_fraction", "max_batch", "loop_guard")}

    def current(self) -> dict:
        s = self.home.load_settings()
        defaults = ServeSettings()
        return {"model": s.get("model") or "default",
                **{k: getattr(defaults, k) if s.get(k) is None else s[k]
                   for k in ("device", "dtype", "gpu_memory_fraction", "max_batch", "loop_guard")}}

    def set_loop_guard(self, on: bool) -> None:
        """Whether completions that loop are cut (the engine reads it for every new request, no reload)."""
        self.home.update_settings(loop_guard=bool(on))

    def choose(self, model: str, device: str = "auto", dtype: str = "auto", gpu_memory_fraction: float = 1.0,
               max_batch: int | None = None) -> dict:
        """Validate and save the base model choice; the engine loads it (raises ValueError / SettingsError).
        max_batch None keeps the saved one."""
        from refact_lab.models.registry import resolve

        if max_batch is None:
            max_batch = self.current()["max_batch"]
        model = (model or "").strip() or "default"
        resolve(model)  # unknown names, folders without config.json or FIM tokens: a clear error now
        checked = ServeSettings(model=model, device=device, dtype=dtype, gpu_memory_fraction=gpu_memory_fraction,
                                max_batch=max_batch)
        self.home.update_settings(model=checked.model, device=checked.device, dtype=checked.dtype,
                                  gpu_memory_fraction=checked.gpu_memory_fraction, max_batch=checked.max_batch)
        if hasattr(self.inference, "start"):
            self.inference.start()
        return self.current()

    def status(self) -> dict:
        try:
            return self.inference.status()
        except Exception as e:  # the panel shows why, it does not break
            return {"state": "unreachable", "error": str(e), "models": [], "memory": {}}

    def wait(self, timeout: float = 300, poll: float = 0.25) -> dict:
        """Wait until the engine has applied the saved choice and finished loading (ready or failed)."""
        wanted = self.current()
        deadline = time.monotonic() + timeout
        snap = self.status()
        while time.monotonic() < deadline:
            snap = self.status()
            applied = snap.get("applied") or {}
            if applied.get("model") == wanted["model"] and applied.get("device") == wanted["device"] \
                    and snap.get("state") in ("ready", "failed"):
                return snap
            time.sleep(poll)
        return snap

    # ---- upstreams ----------------------------------------------------------------------------------------

    def upstream(self) -> dict:
        s = self.home.load_settings()
        return {"openai_key_set": bool(s.get("openai_api_key")), "openai_base_url": s.get("openai_base_url"),
                "upstream_url": s.get("upstream_url"), "upstream_key_set": bool(s.get("upstream_api_key"))}

    def set_openai_key(self, key: str | None, base_url: str | None = None) -> dict:
        """Save (or with an empty key, remove) the OpenAI key: GPT models are then offered and proxied."""
        key = (key or "").strip()
        if key and (len(key) < 8 or " " in key):
            raise ValueError("that does not look like an API key (no spaces, at least 8 characters)")
        self.home.update_settings(openai_api_key=key or None, openai_base_url=(base_url or "").strip() or None)
        return self.upstream()

    def set_upstream(self, url: str | None, api_key: str | None = None) -> dict:
        """Front another OpenAI-compatible engine (e.g. vLLM with LoRA modules); an empty URL removes it."""
        url = (url or "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL (e.g. http://10.0.0.5:8000/v1)")
        self.home.update_settings(upstream_url=url or None, upstream_api_key=(api_key or "").strip() or None)
        return self.upstream()
