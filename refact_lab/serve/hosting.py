"""Model hosting as a service: which base model is served, where it runs, and what the engine says about it.

The choice (model, device, dtype, GPU share) is validated here with the registry, then saved in settings.json
through `refact_lab.serve.state` (its one reader and writer), where the server's engine picks it up and reloads.
Live state, memory and errors come from the engine through an inference client (`refact_lab.serve.client`).
Also keeps the upstream credentials (an OpenAI key, or another OpenAI-compatible engine's URL).

The hosting list: the first model above is entry one; `add_hosted` / `remove_hosted` / `set_loaded` edit the
models hosted beside it (settings.json's `hosted`, which the server's fleet watches), checking the model and its
memory plan first (`refact_lab.serve.memory_plan`); `hosted` is the list with each entry's live state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import dataclasses

from refact_lab.config import ServeSettings, field_specs
from refact_lab.home import Home
from refact_lab.serve import state
from refact_lab.serve.client import default_inference

DEMO_NOTE = ("The embedded default model is a small demo model that ships inside the package and works offline: "
             "good for trying the workflow, weak at real completions. For real use pick a hub model "
             "(Qwen2.5-Coder 0.5B / 1.5B / 7B, StarCoder2, DeepSeek-Coder...) or a local model folder.")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "shard")
# the serving choice's fields the Model hosting form edits besides the model: where it runs, and the loop guard
HOSTING_FIELDS = tuple(f for f in state.fields_of(state.MODEL) if f != "model") + state.fields_of(state.GUARD)


def _key_hint(key: str | None) -> str | None:
    """A stored key as the user may see it: its prefix and last 4 characters (sk-...abcd)."""
    if not key:
        return None
    head = key.split("-", 1)[0] + "-" if "-" in key[:8] else key[:2]
    return f"{head}...{key[-4:]}"


def _check_key_format(key: str, openai: bool) -> None:
    """Refuse what cannot be an API key, with the reason (a pasted sentence, a key cut short, a URL...)."""
    if any(c.isspace() for c in key) or not key.isascii() or not key.isprintable():
        raise ValueError("that does not look like an API key: it has spaces or unusual characters")
    if len(key) < 20:
        raise ValueError(f"that does not look like an API key: {len(key)} characters, keys are longer")
    if openai and not key.startswith("sk-"):
        raise ValueError("that does not look like an OpenAI key: they start with 'sk-'")


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
        return {s["name"]: s for s in field_specs(ServeSettings) if s["name"] in HOSTING_FIELDS}

    def current(self) -> dict:
        choice, _ = state.load(self.home)
        return {"model": choice.model or "default", **{k: getattr(choice, k) for k in HOSTING_FIELDS}}

    def set_loop_guard(self, on: bool) -> None:
        """Whether completions that loop are cut (the engine reads it for every new request, no reload)."""
        state.save(self.home, loop_guard=bool(on))

    def choose(self, model: str, device: str = "auto", dtype: str = "auto", gpu_memory_fraction: float = 1.0,
               max_batch: int | None = None) -> dict:
        """Validate and save the base model choice; the engine loads it (raises ValueError / SettingsError).
        max_batch None keeps the saved one."""
        from refact_lab.models.registry import resolve

        if max_batch is None:
            max_batch = self.current()["max_batch"]
        model = (model or "").strip() or "default"
        resolve(model)  # unknown names, folders without config.json or FIM tokens: a clear error now
        state.save(self.home, model=model, device=device, dtype=dtype, gpu_memory_fraction=gpu_memory_fraction,
                   max_batch=max_batch)
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
        s, _ = state.load(self.home)
        key = s.openai_api_key
        return {"openai_key_set": bool(key), "openai_key_hint": _key_hint(key),
                "openai_base_url": s.openai_base_url,
                "upstream_url": s.upstream_url, "upstream_key_set": bool(s.upstream_api_key)}

    def set_openai_key(self, key: str | None, base_url: str | None = None) -> dict:
        """Save (or with an empty key, remove) the OpenAI key: GPT models are then offered and proxied."""
        key = (key or "").strip()
        base_url = (base_url or "").strip() or None
        if key:
            _check_key_format(key, openai=base_url is None)
        state.save(self.home, openai_api_key=key or None, openai_base_url=base_url)
        return self.upstream()

    def check_openai_key(self, key: str, base_url: str | None = None, timeout: float = 5.0) -> dict:
        """Ask the upstream's models list whether it accepts `key`: {"ok": True, "models": n}, {"ok": False,
        "reason"} (refused: do not save it), or {"ok": None, "reason"} (could not check, e.g. offline).
        A malformed key raises ValueError before any request."""
        _check_key_format(key.strip(), openai=base_url is None)
        import urllib.error
        import urllib.request

        from refact_lab.serve.upstream import DEFAULT_OPENAI_URL

        url = (base_url or DEFAULT_OPENAI_URL).rstrip("/") + "/models"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key.strip()}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = json.loads(response.read(4 << 20) or b"{}")
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return {"ok": False, "reason": f"{url} refused the key (HTTP {e.code})"}
            return {"ok": None, "reason": f"could not check: {url} answered HTTP {e.code}"}
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            return {"ok": None, "reason": f"could not check: {url}: {reason}"}
        return {"ok": True, "models": len(data.get("data") or []) if isinstance(data, dict) else 0}

    def set_upstream(self, url: str | None, api_key: str | None = None) -> dict:
        """Front another OpenAI-compatible engine (e.g. vLLM with LoRA modules); an empty URL removes it."""
        url = (url or "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL (e.g. http://10.0.0.5:8000/v1)")
        state.save(self.home, upstream_url=url or None, upstream_api_key=(api_key or "").strip() or None)
        return self.upstream()

    # ---- the hosting list (several models at once) ------------------------------------------------------------

    def hosted(self, snap: dict | None = None) -> list[dict]:
        """Every hosted model, entry one first, with its live state when the server answers ("unknown" if not).
        `snap`: a status already fetched."""
        live = (snap if snap is not None else self.status()).get("hosted")
        if isinstance(live, list):
            return live
        return [{**row, "state": "unknown", "error": None, "models": []} for row in state.hosting_list(self.home)]

    def _taken_names(self) -> set[str]:
        first = state.hosting_list(self.home)[0]
        names = {first["name"]}
        try:
            from refact_lab.models.registry import resolve

            names.add(resolve(first["model"]).name)
        except ValueError:
            pass
        return names

    def add_hosted(self, model: str, name: str | None = None, placement: str = "auto", dtype: str = "auto",
                   role: str = "none", memory_share: float = 1.0, max_batch: int | None = None,
                   check_memory: bool = True) -> dict:
        """Host another model beside the first (the server loads it without a restart). Raises ValueError with
        the reason: unknown model, a name in use, a bad placement, or a memory plan that does not fit. A role
        another entry held moves to this one."""
        from refact_lab.models.registry import resolve
        from refact_lab.serve import memory_plan

        model = (model or "").strip()
        spec = resolve(model)
        entry = state.HostedModel(name=(name or "").strip() or spec.name, model=model, placement=placement,
                                  dtype=dtype, role=role, memory_share=memory_share,
                                  max_batch=max_batch or self.current()["max_batch"])
        entries = list(state.hosted_entries(self.home))
        if entry.name in self._taken_names() or any(e.name == entry.name for e in entries):
            raise ValueError(f"the name {entry.name!r} is already hosted: give this one another name (--name)")
        if check_memory:
            memory_plan.check_spec(entry.name, spec, entry.placement, entry.dtype, entry.max_batch,
                                   entry.memory_share)
        if role != "none":
            entries = [dataclasses.replace(e, role="none") if e.role == role else e for e in entries]
        state.save_hosted(self.home, entries + [entry])
        return entry.to_dict()

    def remove_hosted(self, name: str) -> None:
        """Stop hosting `name` (its in-flight requests finish first). Entry one cannot be removed."""
        entries = list(state.hosted_entries(self.home))
        if not any(e.name == name for e in entries):
            if name in self._taken_names():
                raise ValueError(f"{name!r} is the server's first model: change it with `refact-lab serve --model` "
                                 "or the Model hosting form, it cannot be removed")
            others = ", ".join(e.name for e in entries) or "only the first model"
            raise ValueError(f"{name!r} is not hosted; hosted: {others}")
        state.save_hosted(self.home, [e for e in entries if e.name != name])

    def set_loaded(self, name: str, loaded: bool) -> dict:
        """Load or unload a hosted entry (an unloaded one stays in the list, its memory freed)."""
        entries = list(state.hosted_entries(self.home))
        match = [e for e in entries if e.name == name]
        if not match:
            raise ValueError(f"{name!r} is not one of the models hosted beside the first "
                             f"({', '.join(e.name for e in entries) or 'none'})")
        new = dataclasses.replace(match[0], loaded=bool(loaded))
        state.save_hosted(self.home, [new if e.name == name else e for e in entries])
        return new.to_dict()

    def set_role(self, name: str, role: str) -> dict:
        """Make a hosted entry the completion or chat default (the entry that had the role gives it up), or
        neither. The model keeps serving: no reload."""
        entries = list(state.hosted_entries(self.home))
        if not any(e.name == name for e in entries):
            raise ValueError(f"{name!r} is not one of the models hosted beside the first "
                             f"({', '.join(e.name for e in entries) or 'none'})")
        if role not in state.ROLES:
            raise ValueError(f"role: {role!r} is not one of {', '.join(state.ROLES)}")
        entries = [dataclasses.replace(e, role=role) if e.name == name else
                   dataclasses.replace(e, role="none") if role != "none" and e.role == role else e for e in entries]
        state.save_hosted(self.home, entries)
        return next(e for e in entries if e.name == name).to_dict()

    def wait_hosted(self, name: str, timeout: float = 300, poll: float = 0.25) -> dict:
        """Wait until the server's entry `name` settles (ready, failed, unloaded, or gone from the list)."""
        deadline = time.monotonic() + timeout
        row: dict = {}
        while time.monotonic() < deadline:
            rows = {r["name"]: r for r in self.hosted()}
            row = rows.get(name, {"name": name, "state": "removed"})
            if row.get("state") in ("ready", "failed", "unloaded", "removed", "unreachable"):
                return row
            time.sleep(poll)
        return row
