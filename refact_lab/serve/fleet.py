"""Several models in one server: the running set of engines, one per hosted model.

Entry one of the hosting list is the server's first `Engine` (it reads the flat model fields of settings.json, as
a single-model server always did); every loaded entry of `hosted` (see `refact_lab.serve.state.HostedModel`)
gets an `Engine` of its own, with its own scheduler thread and batch, so a slow or failing model never stalls
another. The fleet watches settings.json (a cheap stat every `poll_interval`): an added entry starts its engine
(it loads in the background), a removed or unloaded one stops taking requests at once, and its engine stops
once its in-flight rows have finished (or after `drain_timeout`). A changed entry is both: the old engine drains
while the new one loads.

Requests pick their engine here: the `model` field names a hosted model (or NAME:lora, its deployed adapter);
without one, completions go to the entry with the completion role and chat to the one with the chat role
(entry one when no entry claims the role).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from refact_lab.home import Home
from refact_lab.serve import state
from refact_lab.serve.engine import Engine, EngineError
from refact_lab.serve.state import HostedModel, LoraChoice, ServingChoice

log = logging.getLogger("refact_lab.fleet")
COMPLETION, CHAT = "completion", "chat"


# ---- what the engine asks (placement, loading, LoRA) ------------------------------------------------------------

def engine_device(placement: str) -> str:
    """A placement in the engine's device words: gpu:N and share:N run on cuda:N; shard:N,M is loaded by
    `load_on_gpus`."""
    if placement.startswith(("gpu:", "share:")):
        return "cuda:" + placement.split(":")[1]
    if placement.startswith("shard:"):
        return "shard"
    return placement


def load_on_gpus(spec, gpus: tuple[int, ...], dtype: str):
    """The model split over exactly these GPUs by accelerate's device map (the others are left alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    from refact_lab.models.loading import MODEL_LOADING

    max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in gpus}
    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=getattr(torch, dtype), device_map="auto",
                                                     max_memory=max_memory, attn_implementation="sdpa")
    model.eval()
    return model


def _model_key(text: str | None) -> str:
    """One spelling per model: registry names become their source, folders their absolute path."""
    from refact_lab.models.registry import KNOWN_MODELS

    text = (text or "default").strip()
    if text in KNOWN_MODELS:
        text = KNOWN_MODELS[text].source
    path = Path(text).expanduser()
    return str(path.resolve()) if path.is_dir() else text.lower()


def lora_target(home: Home, choice: ServingChoice, fallback_model: str | None = None) -> str | None:
    """The hosted entry the LoRA choice deploys onto (None: entry one): the one serving the model the run was
    trained from. Entry one when it serves that model, when no entry does, or when the run cannot be read."""
    if choice.lora.mode == "off" or not choice.hosted:
        return None
    from refact_lab.home import read_json
    from refact_lab.serve import checkpoints

    try:
        ck = checkpoints.resolve(home, choice.lora)
        run = read_json(home.run_dir(ck.run_id) / "settings.json", {}) if ck else {}
    except (ValueError, OSError):
        return None
    trained = {_model_key(run.get("model"))} if run.get("model") else set()
    if not trained or _model_key(choice.model or fallback_model) in trained:
        return None
    for e in choice.hosted:
        if _model_key(e.model) in trained:
            return e.name
    return None


def lora_for(home: Home, choice: ServingChoice, entry: HostedModel | None,
             fallback_model: str | None = None) -> ServingChoice:
    """The serving choice as one engine applies it: the LoRA only on the engine of the model it was trained from
    (off elsewhere). With no hosted entries it is the choice itself (a single-model server, as before)."""
    if not choice.hosted and entry is None:
        return choice
    mine = entry.name if entry is not None else None
    if lora_target(home, choice, fallback_model) == mine:
        return choice
    return replace(choice, lora=LoraChoice())


# ---- the fleet ---------------------------------------------------------------------------------------------------

class Fleet:
    """Entry one's engine plus one engine per loaded hosted entry. Thread-safe; `start` / `stop` own the threads."""

    def __init__(self, home: Home, primary: Engine, *, poll_interval: float = 0.5, drain_timeout: float = 120,
                 engine_options: dict | None = None):
        """`engine_options`: Engine keyword arguments every hosted model's engine gets (the server's options,
        such as `prefix_cache_mib`), as the primary engine got them."""
        self.home = home
        self.primary = primary
        self.engine_options = dict(engine_options or {})
        self.poll_interval = poll_interval
        self.drain_timeout = drain_timeout
        self._lock = threading.RLock()
        self._hosted: dict[str, tuple[HostedModel, Engine]] = {}
        self._retiring: dict[str, Engine] = {}
        self._problem: str | None = None    # a bad `hosted` list in settings.json: the running set is kept
        self._stamp = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._version = primary.caps_version
        self._seen: tuple = ()   # (engine, its caps_version) as last reported: a change there moves ours

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> "Fleet":
        self.primary.start()
        self.sync()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="refact-lab-fleet", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        with self._lock:
            engines = [self.primary] + [e for _, e in self._hosted.values()] + list(self._retiring.values())
        # stop them together: each gets `timeout`, not the sum of all
        threads = [threading.Thread(target=e.stop, args=(timeout,), daemon=True) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 1)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            try:
                st = os.stat(self.home.settings_file)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                try:
                    self.sync()
                except Exception:  # the watcher must outlive one bad change
                    log.exception("hosting list change not applied")

    def sync(self) -> None:
        """Start and stop engines so the running set matches settings.json's hosting list."""
        try:
            st = os.stat(self.home.settings_file)
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            self._stamp = None
        choice, problems = state.load(self.home)
        with self._lock:
            self._problem = problems.get(state.HOSTED)
            if self._problem:
                return  # keep what runs; the status shows the problem
            wanted = {e.name: e for e in choice.hosted if e.loaded}
            changed = False
            for name, (entry, engine) in list(self._hosted.items()):
                new = wanted.get(name)
                if new is not None and new != entry and replace(new, role=entry.role) == entry:
                    # only the role changed: the same engine keeps serving (no reload for a new default)
                    self._hosted[name] = (new, engine)
                    engine.entry = new
                    changed = True
                elif new != entry:
                    del self._hosted[name]
                    self._retire(name, engine)
                    changed = True
            for name, entry in wanted.items():
                if name not in self._hosted:
                    changed = True
                    engine = Engine(self.home, entry=entry, poll_interval=self.primary.poll_interval,
                                    **self.engine_options)
                    self._hosted[name] = (entry, engine)
                    engine.start()
                    log.info("hosting %s (%s on %s)", name, entry.model, entry.placement)
            # only when the hosted set or a role changed: settings.json also changes for a LoRA deploy, and a
            # version moved before the engine applied it would send clients to fetch the caps too early
            if changed:
                self._bump()

    def _retire(self, name: str, engine: Engine) -> None:
        """No new requests reach `engine` (it left the map); it stops once its rows finished or after the timeout."""
        self._retiring[f"{name}#{id(engine)}"] = engine

        def drain():
            deadline = time.monotonic() + self.drain_timeout
            while time.monotonic() < deadline and not self._stopping.is_set():
                snap = engine.snapshot()
                if not snap["active"] and not snap["waiting"]:
                    break
                time.sleep(0.05)
            engine.stop(5)
            with self._lock:
                self._retiring.pop(f"{name}#{id(engine)}", None)
                self._bump()
            log.info("stopped hosting %s", name)

        threading.Thread(target=drain, name=f"refact-lab-retire-{name}", daemon=True).start()

    def _bump(self) -> None:
        self._version = max(self._version + 1, int(time.time()), *(e.caps_version for e in self.engines()))

    # ---- routing ------------------------------------------------------------------------------------------

    @property
    def caps_version(self) -> int:
        """Moves whenever any engine's served models change, or the hosting list does; never goes back."""
        with self._lock:
            # engines' versions are wall-clock based like ours: one may move to a number ours already passed, so
            # any change of one moves ours past everything seen
            seen = tuple((id(e), e.caps_version) for e in self.engines())
            if seen != self._seen:
                self._seen = seen
                self._version = max(self._version + 1, int(time.time()), *(v for _, v in seen))
            return self._version

    def engines(self) -> list[Engine]:
        with self._lock:
            return [self.primary] + [e for _, e in self._hosted.values()]

    def routes(self) -> list:
        """(engine, route) of every model served now, entry one first."""
        return [(e, r) for e in self.engines() for r in e.served_models()]

    def names(self) -> set[str]:
        return {r.name for _, r in self.routes()}

    def role_engine(self, role: str) -> Engine | None:
        """The engine of the entry with this role (entry one holds the completion role unless another claims it)."""
        with self._lock:
            for entry, engine in self._hosted.values():
                if entry.role == role:
                    return engine
        return self.primary if role == COMPLETION else None

    def default_engine(self, kind: str = COMPLETION) -> Engine:
        return self.role_engine(kind) or self.role_engine(COMPLETION) or self.primary

    def _claims(self, engine: Engine, name: str) -> bool:
        """Whether `name` means this engine's model, whether it is ready or still loading."""
        base = name[:-len(state.LORA_SUFFIX)] if name.endswith(state.LORA_SUFFIX) else name
        if engine.state == "ready":
            try:
                engine.route(name)
                return True
            except EngineError:
                return False
        if engine.entry is not None:
            return base in (engine.entry.name, engine.entry.model)
        pending = engine.loading_model() or {}
        cfg = engine.config or engine._requested
        return base in {pending.get("name"), cfg.model if cfg else None, engine.fallback_model} - {None}

    def engine_for(self, name: str | None, kind: str = COMPLETION) -> Engine:
        """The engine a request's `model` field picks (its kind's default without one). EngineError 404 names
        every hosted model when none is `name`."""
        if not name:
            return self.default_engine(kind)
        engines = self.engines()
        for engine in engines:
            if self._claims(engine, name):
                return engine
        if len(engines) == 1:
            return engines[0]  # one model: its engine answers for itself (not ready, or the names it has)
        known = sorted(self.names() | {n for n in (self._pending_name(e) for e in engines) if n})
        raise EngineError(f"unknown model {name!r}; this server hosts {', '.join(known) or 'no model yet'}", 404)

    @staticmethod
    def _pending_name(engine: Engine) -> str | None:
        if engine.entry is not None:
            return engine.entry.name
        pending = engine.loading_model()
        return pending["name"] if pending else None

    def is_loading(self, name: str | None = None, kind: str = COMPLETION) -> bool:
        """Whether the engine `name` picks is on its way (any engine is, when no engine claims the name)."""
        if not name:
            return self.default_engine(kind).is_loading()
        engines = self.engines()
        claimed = [e for e in engines if self._claims(e, name)]
        return any(e.is_loading() for e in (claimed or engines))

    def lora_engine(self) -> Engine:
        """The engine the saved LoRA choice deploys onto (the model its run was trained from; else entry one)."""
        name = lora_target(self.home, state.load(self.home)[0], self.primary.fallback_model)
        with self._lock:
            hosted = self._hosted.get(name) if name else None
        return hosted[1] if hosted else self.primary

    # ---- state for the status, the panel and the CLI ---------------------------------------------------------

    def listing(self) -> list[dict]:
        """Every entry of the hosting list with what its engine says: state, error, device, memory, models."""
        choice, _ = state.load(self.home)
        rows = [state.first_entry(choice, self.primary.fallback_model)]
        rows += [{**e.to_dict(), "source": state.HOSTED} for e in choice.hosted]
        with self._lock:
            running = {name: engine for name, (_, engine) in self._hosted.items()}
            draining = {key.split("#")[0] for key in self._retiring}
        out = []
        for row in rows:
            engine = self.primary if row["source"] == state.FIRST else running.get(row["name"])
            if engine is None:
                live = {"state": "stopping" if row["name"] in draining else
                        ("unloaded" if not row["loaded"] else "starting"), "error": None, "models": []}
            else:
                snap = engine.snapshot()
                live = {k: snap.get(k) for k in ("state", "error", "device", "n_ctx", "load_seconds", "models", "decode_step",
                                                 "active", "waiting")}
                live["loaded_dtype"] = snap.get("dtype")   # what "auto" became
                live["weights_mb"] = (snap.get("memory") or {}).get("weights_mb")
                if row["source"] == state.FIRST and snap.get("model"):
                    row["name"] = snap["model"]
            out.append({**row, **live})
        return out

    def problem(self) -> str | None:
        return self._problem


def default_chat_name(fleet: Fleet) -> str | None:
    """The chat role's model name (its LoRA variant when one is deployed), or None when no entry has the role."""
    engine = fleet.role_engine(CHAT)
    return engine.default_model() if engine is not None else None

