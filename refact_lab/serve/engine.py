"""The inference engine: one scheduler thread owns the model; every request goes through its queue.

Handlers (on tornado's event loop), the CLI and notebooks never touch the model. They build a `Generation`
(token ids, sampling parameters, a `sink` callback for events) and `submit` it. The scheduler thread:

1. applies changes to `settings.json` between steps (see `refact_lab.serve.state`): loads the base model,
   deploys a LoRA checkpoint without a restart, reloads after a model change once in-flight requests drained;
2. admits queued generations into per-adapter groups: generations are pinned to the adapter that was deployed
   when they were submitted, so a switch never changes a running completion;
3. runs one step for one group at a time (round robin): a prefill that merges newcomers into that group's
   batch, or one decode pass for every row of the batch (`refact_lab.serve.batch`); in that pass greedy rows
   of a small batch check tokens drafted from their own text and may take several
   (`refact_lab.serve.speculative`), and newcomers whose prompt the prefix cache holds but for a few tokens run
   those tokens (`Engine._pass`);
4. after every token checks each row's stop rules, cancel flag (set when a client disconnects) and length,
   streams the safe part of the text to the row's sink, and drops finished rows from the batch.

State for the panels and tests is in `snapshot()`: loading / ready / failed with the reason, memory, the
deployed adapter, `caps_version` (changes whenever the served models change), counters and the last requests.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from refact_lab.config import ServeSettings
from refact_lab.context.serving import RepoContext
from refact_lab.home import Home
from refact_lab.models.healing import heal_fim_prompt, vocabulary
from refact_lab.serve import checkpoints, state
from refact_lab.serve.batch import Batch, sample
from refact_lab.serve.prefix_cache import PrefixCache, common_prefix
from refact_lab.serve.speculative import agreed, draft
from refact_lab.serve.state import LoraChoice, ServingChoice, lora_model_name
from refact_lab.serve.stops import REPLACEMENT_CHAR, StopRules

log = logging.getLogger("refact_lab.engine")
SHUTTING_DOWN = "the server is shutting down"
# rows x tokens of a pass that mixes drafts and newcomers' prompt rests (Engine._pass): on this project's 2-core
# CPU a pass of 16 rows x 4 tokens costs about a 16-row step plus a 4-token rest run alone
PASS_TOKENS = 64
DRAFT_ROWS = 4
MISS_PAUSE = 2  # plain steps after a pass whose drafts all missed

Event = dict
Sink = Callable[[Event], None]


class EngineError(Exception):
    """A request the engine cannot take: `status` is the HTTP status a handler should answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    single_line: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class Route:
    """What a model name means now: the base model, optionally with the LoRA checkpoint deployed at that moment."""

    name: str
    base: str
    adapter: checkpoints.Checkpoint | None
    n_ctx: int
    fim: Any  # FimFormat


@dataclass(eq=False)
class Generation:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    route: Route | None = None
    index: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: bool = False
    extra_stops: tuple[str, ...] = ()
    stream: bool = True  # False: only the final "done" event (no per-token wake-ups of the caller)
    # owned by the scheduler thread
    rules: StopRules | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    pos: int = 0
    last_token: int = 0
    generator: Any = None
    healed: str = ""                 # token healing: text of the prompt token removed (see models.healing)
    first_allowed: list[int] | None = None  # ...and the tokens the completion may start with
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    draft_tokens: int | None = None  # speculative decoding: drafts to try next (adapts to how many were accepted)
    plain_steps: int = 0             # ...and plain steps to take before drafting again, after a miss
    history: tuple = ()              # ...and the nearest stored prompt's completion, a draft source
    ahead: tuple = ()                # ...and what of it the user has not typed yet: drafts of the first pass

    def cancel(self) -> None:
        # a plain attribute write is atomic; the scheduler reads it before every step
        self.cancelled = True

    @property
    def adapter_key(self) -> str | None:
        return self.route.adapter.key if self.route and self.route.adapter else None


@dataclass(frozen=True)
class ModelConfig:
    """The model part of the serving choice with the model resolved: what a load is asked for / applied."""

    model: str
    device: str
    dtype: str
    gpu_memory_fraction: float
    max_batch: int


def model_config(choice: ServingChoice, fallback_model: str | None = None) -> ModelConfig:
    return ModelConfig(**{**choice.part(state.MODEL), "model": choice.model or fallback_model or "default"})


class _Group:
    """The generations of one adapter (None: the base model): the running batch and those waiting to join."""

    def __init__(self, key: str | None, checkpoint: checkpoints.Checkpoint | None):
        self.key = key
        self.checkpoint = checkpoint
        self.batch = Batch()
        self.waiting: collections.deque[Generation] = collections.deque()

    def busy(self) -> bool:
        return bool(len(self.batch) or self.waiting)


class Engine:
    """Serves one base model and its deployed LoRA. Thread-safe entry points: submit, route, encode, snapshot."""

    def __init__(self, home: Home, *, model: str | None = None, poll_interval: float = 0.2,
                 rescan_interval: float = 3.0, max_records: int = 200, overrides: dict | None = None,
                 prefix_cache_mib: int | None = None, entry=None, speculative_tokens: int | None = None,
                 compile_decode: str | None = None):
        """`model`: used when settings.json names none. `overrides`: settings that win over settings.json
        without being saved (the CLI's one-off --model / --lora). `prefix_cache_mib`: memory for recent prompts'
        KV (0: no prefix reuse; None: ServeSettings' default). `entry`: a `state.HostedModel` of the hosting list
        (a model hosted beside the first, see serve/fleet.py): its model, placement and dtype are fixed (the fleet
        replaces the engine when they change) and its routes carry the entry's name. `speculative_tokens`: tokens
        drafted from the text per step for a greedy request (0: off; None: ServeSettings' default).
        `compile_decode`: auto / on / off, whether the decode step is compiled at model load
        (refact_lab.serve.decode_step; None: ServeSettings' default)."""
        self.home = home
        self.entry = entry
        self.fallback_model = model
        self.overrides = dict(overrides or {})
        self.repo_context = RepoContext(home)   # FIM prompts' snippets from other files of the project
        self.poll_interval = poll_interval
        self.rescan_interval = rescan_interval
        self._inbox: queue.Queue[Generation] = queue.Queue()
        self._lock = threading.RLock()        # guards the fields snapshot() reads
        self._tok_lock = threading.Lock()     # fast tokenizers are not safe for concurrent calls
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # model state
        self.state = "starting"
        self.error: str | None = None
        self.config: ModelConfig | None = None
        self.spec = None
        self._fim_markers = None  # the FIM markers' token ids in the served model's tokenizer (None: not single tokens)
        self.model = None
        self.tokenizer = None
        self.n_ctx = 0
        self.device_label = ""
        self.dtype_label = ""
        self.weights_bytes = 0
        self.load_seconds: float | None = None
        self._loading_name: str | None = None  # the registry name of the model being loaded
        self._stop_ids: set[int] = set()
        self._has_chat_template = False
        # LoRA state
        self.lora_choice = LoraChoice()
        self.lora_applied: LoraChoice | None = None  # the choice the deployed adapter was resolved from
        self.deployed: checkpoints.Checkpoint | None = None
        self.lora_error: str | None = None
        self._adapter_names: dict[str, str] = {}   # checkpoint key -> peft adapter name
        self._adapter_seq = itertools.count()
        # settings watching
        self.choice = ServingChoice()
        self.settings_problems: dict[str, str] = {}  # {part: message}: bad values in settings.json, shown in status
        self._settings_stamp = None
        self._requested: ModelConfig | None = None
        self._last_poll = 0.0
        self._last_rescan = 0.0
        self._lora_dirty = True
        self.caps_version = int(time.time())
        # scheduling
        self._groups: dict[str | None, _Group] = {}
        self._rr = 0
        if prefix_cache_mib is None:
            prefix_cache_mib = ServeSettings.__dataclass_fields__["prefix_cache_mib"].default
        self.prefix_cache = PrefixCache(int(prefix_cache_mib) * 2**20)
        self._prefix_model = None  # weak reference to the base model the stored prompts were computed with
        if speculative_tokens is None:
            speculative_tokens = ServeSettings.__dataclass_fields__["speculative_tokens"].default
        self.speculative_tokens = int(speculative_tokens)
        self.speculative = collections.Counter()  # steps, drafted, accepted: drafts the model agreed with
        self.compile_decode = compile_decode or ServeSettings.__dataclass_fields__["compile_decode"].default
        self.decoder = None  # the lean decode step of the loaded model (None: transformers' forward)
        self.twin = None  # a bf16 copy for prompts and wide batches of a small fp32 model (serve/bf16_twin.py)
        # bookkeeping
        self.counters = collections.Counter()
        self.records: collections.deque[dict] = collections.deque(maxlen=max_records)
        self._read_settings(force=True)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="refact-lab-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_ready(self, timeout: float = 120) -> "Engine":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state == "ready":
                return self
            if self.state == "failed":
                raise RuntimeError(f"model failed to load: {self.error}")
            time.sleep(0.05)
        raise TimeoutError(f"model not ready after {timeout}s (state {self.state})")

    # ---- entry points (any thread) -------------------------------------------------------------------------

    def served_models(self) -> list[Route]:
        with self._lock:
            if self.state != "ready":
                return []
            name = self.entry.name if self.entry is not None else self.spec.name
            base = Route(name, self.spec.name, None, self.n_ctx, self.spec.fim)
            out = [base]
            if self.deployed is not None:
                out.append(Route(lora_model_name(name), self.spec.name, self.deployed, self.n_ctx, self.spec.fim))
            return out

    def is_loading(self) -> bool:
        """Whether a model is on its way (the engine is starting, or loading one): worth waiting for."""
        return self.state in ("starting", "loading")

    def loading_model(self) -> dict | None:
        """{"name", "state"} of the model being loaded, or None when none is."""
        with self._lock:
            if self.state not in ("starting", "loading"):
                return None
            cfg = self.config or self._requested
            name = self._loading_name or (cfg.model if cfg else self.fallback_model) or "default"
            return {"name": self.entry.name if self.entry is not None else name, "state": self.state}

    def default_model(self) -> str | None:
        """What a request without a model gets: the fine-tuned variant when one is deployed."""
        models = self.served_models()
        return models[-1].name if models else None

    def route(self, name: str | None) -> Route:
        """Resolve a model name now (pinning the deployed adapter). Raises EngineError (404 / 503)."""
        with self._lock:
            if self.state != "ready":
                reason = f": {self.error}" if self.error else ""
                raise EngineError(f"the model is not ready (state: {self.state}{reason})", 503)
            models = self.served_models()
            if not name:
                return models[-1]
            aliases = {self.spec.name, self.spec.source} | ({self.entry.model} if self.entry is not None else set())
            for r in models:
                if name == r.name or (r.adapter is None and name in aliases):
                    return r
            raise EngineError(f"unknown model {name!r}; this server has {', '.join(m.name for m in models)}", 404)

    def encode(self, text: str, special: bool = True) -> list[int]:
        with self._tok_lock:
            tok = self.tokenizer
            if tok is None:
                raise EngineError(f"the model is not ready (state: {self.state})", 503)
            return tok(text, add_special_tokens=special)["input_ids"]

    def decode_prompt(self, ids: list[int]) -> str:
        """A prompt as text with its markers spelled out (what Tabby's `debug_options.return_prompt` shows)."""
        with self._tok_lock:
            tok = self.tokenizer
            if tok is None:
                raise EngineError(f"the model is not ready (state: {self.state})", 503)
            return tok.decode(ids, skip_special_tokens=False)

    def encode_fim(self, fim, prefix: str, suffix: str, max_prompt_tokens: int | None = None, *,
                   snippets=(), context_tokens: int | None = None, path: str = "", repo: str = "",
                   fit_tokens: int | None = None) -> list[int]:
        """A FIM prompt, cut to the end of the prefix and the start of the suffix when `max_prompt_tokens` is
        given (what an IDE plugin that sends whole files expects), with context `snippets` from other files
        laid out by the one prompt builder (models/prompt.py). The code is content: a marker spelled in it
        stays text. Falls back to parsing the joined text when the FIM markers are not single tokens."""
        from refact_lab.models.prompt import build_fim_ids, build_fim_text
        from refact_lab.models.registry import lead_ids

        with self._tok_lock:
            tok = self.tokenizer
            if tok is None:
                raise EngineError(f"the model is not ready (state: {self.state})", 503)
            if fim.marker_ids(tok) is not None:
                lead = lead_ids(tok)
                return lead + build_fim_ids(
                    tok, fim, prefix, suffix, snippets, max_prompt_tokens=max_prompt_tokens,
                    context_tokens=context_tokens, path=path, repo=repo,
                    fit_tokens=None if fit_tokens is None else fit_tokens - len(lead)).ids
        return self.encode(build_fim_text(fim, prefix, suffix, snippets, path))

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], tuple[str, ...]]:
        """A chat as prompt ids, plus extra stop strings.

        With the tokenizer's chat template, the template's own text is parsed (its role markers are special
        tokens) but every message's content is encoded as content: a pasted file that spells "<|im_end|>" or
        "<|endoftext|>" cannot end a turn or the document. A base model has no chat template; it gets a plain
        transcript ending in "Assistant:" and stops when it starts writing the next "User:" turn.
        """
        from refact_lab.models.registry import content_ids, lead_ids

        with self._tok_lock:
            tok = self.tokenizer
            if tok is None:
                raise EngineError(f"the model is not ready (state: {self.state})", 503)
            if self._has_chat_template:
                return self._templated_chat_ids(tok, messages), ()
            names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
            lines = [f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
            return lead_ids(tok) + content_ids(tok, "\n".join(lines) + "\nAssistant:"), ("\nUser:", "\nSystem:")

    @staticmethod
    def _templated_chat_ids(tok, messages: list[dict]) -> list[int]:
        from refact_lab.models.registry import content_ids

        # Render with placeholders (private-use characters no client sends), then encode the template's pieces
        # as special-token text and the messages' contents as content. A template that rewrites the content
        # (Llama 3's `| trim`) would not give back the real rendering: then that is parsed whole, as any server does.
        real = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = tok.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                           tokenize=False, add_generation_prompt=True)
        pieces, rest = [], rendered
        for mark in marks:
            if rest.count(mark) != 1:
                return tok(real, add_special_tokens=False)["input_ids"]
            before, rest = rest.split(mark)
            pieces.append(before)
        if "".join(p + m["content"] for p, m in zip(pieces, messages)) + rest != real:
            return tok(real, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for template_text, message in zip(pieces, messages):
            ids += tok(template_text, add_special_tokens=False)["input_ids"] if template_text else []
            ids += content_ids(tok, message["content"])
        return ids + (tok(rest, add_special_tokens=False)["input_ids"] if rest else [])

    def tokenizer_json(self) -> str:
        with self._tok_lock:
            if self.tokenizer is None:
                raise EngineError(f"the model is not ready (state: {self.state})", 503)
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise EngineError("this model's tokenizer has no tokenizers JSON form", 404)
            return backend.to_str()

    def submit(self, gen: Generation) -> Generation:
        if self._stopping.is_set():
            raise EngineError(SHUTTING_DOWN, 503)
        if gen.route is None:
            gen.route = self.route(None)
        if not gen.prompt_ids:
            # an empty prompt means "the start of a file": the token training put before every file
            with self._tok_lock:
                tok = self.tokenizer
                start = None if tok is None else (tok.bos_token_id if tok.bos_token_id is not None
                                                  else tok.eos_token_id)
            if start is None:
                raise EngineError("the prompt is empty and this model's tokenizer has no start token", 400)
            gen.prompt_ids = [start]
        with self._lock:
            self.counters["submitted"] += 1
        self._inbox.put(gen)
        return gen

    def generate(self, prompt: str | list[int], params: SamplingParams = SamplingParams(), model: str | None = None,
                 timeout: float = 600) -> dict:
        """Blocking helper for the CLI, notebooks and tests: the finished event (text, finish_reason, ...)."""
        route = self.route(model)
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        events: queue.Queue = queue.Queue()
        gen = self.submit(Generation(ids, params, events.put, route=route, stream=False))
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                gen.cancel()  # nobody waits for it any more
                raise TimeoutError(f"no completion within {timeout}s") from None
            if ev["type"] == "done":
                return ev
            if ev["type"] == "error":
                raise EngineError(ev["message"], 500)

    def snapshot(self) -> dict:
        with self._lock:
            active = sum(len(g.batch) for g in self._groups.values())
            waiting = sum(len(g.waiting) for g in self._groups.values()) + self._inbox.qsize()
            dep = self.deployed
            return {
                "state": self.state, "error": self.error,
                "model": self.spec.name if self.spec else (self.config.model if self.config else None),
                "source": self.spec.source if self.spec else None,
                "requested": vars(self._requested) if self._requested else None,
                "applied": vars(self.config) if self.config else None,
                "device": self.device_label, "dtype": self.dtype_label, "n_ctx": self.n_ctx,
                "load_seconds": self.load_seconds,
                "memory": self._memory(),
                "models": [r.name for r in self.served_models()],
                "settings_errors": dict(self.settings_problems),
                "lora": {"choice": self.lora_choice.to_dict(), "label": self.lora_choice.label(),
                         "applied": self.lora_applied.to_dict() if self.lora_applied else None,
                         "deployed": {"run_id": dep.run_id, "checkpoint": dep.name, "path": str(dep.path)}
                         if dep else None,
                         # a choice settings.json cannot express is an error too, not only a log line
                         "error": self.settings_problems.get(state.LORA) or self.lora_error,
                         "loaded": sorted(self._adapter_names)},
                "caps_version": self.caps_version,
                "active": active, "waiting": waiting,
                "counters": dict(self.counters),
                "prefix_cache": self.prefix_cache.stats(),
                "decode_step": self.decoder.stats() if self.decoder is not None else
                {"path": "transformers", "compile": False},
                "bf16_twin": self.twin.stats() if self.twin is not None else None,
                "speculative": {"tokens": self.speculative_tokens,
                                **{k: self.speculative[k] for k in ("steps", "drafted", "accepted", "ties", "shared")}},
                "recent": list(self.records)[-50:],
            }

    # ---- the scheduler thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        self._apply_model(self._requested)
        while not self._stopping.is_set():
            try:
                self._poll_settings()
                if self._requested != self.config and not self._any_rows():
                    self._apply_model(self._requested)
                    continue
                self._admit(block=not self._any_work())
                if self.state == "ready" and self._any_work():
                    self._step()
            except Exception as exc:  # the loop must survive anything one request or one change does
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        # stopping: every request still running or queued gets an error event, so its stream ends (issue 17)
        self._fail_all(SHUTTING_DOWN)
        while True:
            try:
                self._emit_error(self._inbox.get_nowait(), SHUTTING_DOWN)
            except queue.Empty:
                break

    def _any_rows(self) -> bool:
        return any(len(g.batch) for g in self._groups.values())

    def _any_work(self) -> bool:
        return any(g.busy() for g in self._groups.values())

    def _admit(self, block: bool) -> None:
        if self._requested != self.config:
            # a model change is pending: new requests wait in the inbox until it is applied
            if block:
                time.sleep(0.02)
            return
        try:
            gen = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if self.state != "ready":
                self._emit_error(gen, f"the model is not available (state: {self.state}: {self.error})")
            elif gen.route.base != self.spec.name:
                self._emit_error(gen, f"model {gen.route.name!r} is no longer served (the base model changed)")
            else:
                group = self._groups.get(gen.adapter_key)
                if group is None:
                    group = self._groups[gen.adapter_key] = _Group(gen.adapter_key, gen.route.adapter)
                group.waiting.append(gen)
            try:
                gen = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        keys = [k for k, g in self._groups.items() if g.busy()]
        group = self._groups[keys[self._rr % len(keys)]]
        self._rr += 1
        self._drop_cancelled(group)
        if not group.busy():
            self._retire(group)
            return
        room = self.config.max_batch - len(group.batch)
        newcomers: list[Generation] = []
        try:
            if group.checkpoint is not None:
                # normally loaded when deployed; reloaded here if a model reload dropped it meanwhile
                self._load_adapter(group.checkpoint)
            model = self.model
            if group.waiting and room > 0:
                newcomers = [group.waiting.popleft() for _ in range(min(room, len(group.waiting)))]
                for g in newcomers:
                    self._prepare(g)
                self._check_prefix_owner(model)
                joining, others = self._split_newcomers(group, newcomers)
                if others:
                    rows, reuse = [g for g, _ in others], [r for _, r in others]
                    twin = self.twin
                    with self._adapter_contexts(model, group.key, twin):
                        logits = group.batch.prefill(model, rows, self.prefix_cache, group.key, self.decoder, twin,
                                                     reuse=reuse)
                    self._accept(group, rows, sample(logits, rows))
                if joining:
                    self._pass(group, model, joining)
            elif len(group.batch) and not self._pass(group, model, []):
                twin = self.twin if self.twin is not None and self.twin.wants_step(len(group.batch)) else None
                with self._adapter_contexts(model, group.key, twin):
                    logits = group.batch.step(model, self.decoder, twin)
                self._accept(group, list(group.batch.rows), sample(logits, group.batch.rows))
        except Exception as exc:
            log.exception("decoding failed for adapter %s", group.key)
            message = f"generation failed: {type(exc).__name__}: {exc}"
            in_batch = {id(g) for g in group.batch.rows}
            if newcomers and not any(id(g) in in_batch for g in newcomers):
                # the prefill failed before the merge: only the newcomers are affected
                failed = newcomers
            else:
                # a failed step leaves the shared cache in an unknown state: the whole batch ends
                failed = list({id(g): g for g in [*newcomers, *group.batch.rows]}.values())
                group.batch = Batch()
            for g in failed:
                self._emit_error(g, message)
        self._retire(group)

    def _retire(self, group: _Group) -> None:
        if not group.busy():
            self._groups.pop(group.key, None)
            if group.key is not None and (self.deployed is None or self.deployed.key != group.key):
                self._unload_adapter(group.key)
                self.prefix_cache.drop_key(group.key)

    def _check_prefix_owner(self, model) -> None:
        """Stored prompts hold the KV of one base model: forget them when another one is served."""
        import weakref

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        owner = self._prefix_model() if self._prefix_model is not None else None
        if owner is not base:
            self.prefix_cache.clear()
            self._prefix_model = weakref.ref(base)

    def _prepare(self, g: Generation) -> None:
        import torch

        special = tuple(self.spec.fim.stop_tokens) if self.spec else ()
        loop_guard = self.choice.loop_guard
        context = ""
        if loop_guard:
            with self._tok_lock:
                # the guard lets a completion repeat what the code around the cursor repeats (tables, rows)
                context = self.tokenizer.decode(g.prompt_ids[-2048:], skip_special_tokens=False)
        g.rules = StopRules(tuple(g.params.stop) + g.extra_stops, g.params.single_line, special,
                            loop_guard=loop_guard, context=context)
        if self.spec is not None and not g.healed:
            # every FIM-shaped prompt is healed, whoever built it (our suffix API, Tabby, refact-lsp's own prompt)
            with self._tok_lock:
                ids, healed, allowed = heal_fim_prompt(self.tokenizer, self.spec.fim, g.prompt_ids)
            if healed:
                g.prompt_ids, g.healed, g.first_allowed = ids, healed, allowed
        # the previous keystroke's completion, a draft source for speculative decoding (serve/prefix_cache.py)
        g.history, g.ahead = (), ()
        if self.speculative_tokens > 0 and g.params.temperature == 0 and self.prefix_cache.enabled:
            before, g.history = self.prefix_cache.completion_near(g.adapter_key, g.prompt_ids)
            if g.history:
                g.ahead = self._typed_ahead(before, g.history, g.prompt_ids, g.healed)
        if g.params.seed is not None and g.params.temperature > 0:
            # any JSON integer is a seed; torch takes 64 bits
            g.generator = torch.Generator().manual_seed(g.params.seed % 2**63)
        g.first_token_at = None

    def _accept(self, group: _Group, rows: list[Generation], tokens: list[int]) -> None:
        """Take one new token per row, stream text, and remove rows that finished."""
        finished = set()
        for g, tok in zip(rows, tokens):
            if g.first_token_at is None:
                g.first_token_at = time.monotonic()
            reason = self._advance(g, tok)
            if reason:
                self._finish(g, reason)
                finished.add(id(g))
        with self._lock:
            self.counters["tokens"] += len(rows)
        if finished:
            group.batch.keep([i for i, r in enumerate(group.batch.rows) if id(r) not in finished])

    def _before_cursor(self, ids) -> int:
        """How many of a prompt's tokens come before the cursor (FimFormat.cursor_index); all of a prompt that is
        not laid out as FIM."""
        end = self.spec.fim.cursor_index(ids, self._fim_markers) if self._fim_markers is not None else None
        return len(ids) if end is None else end

    def _typed_ahead(self, before: tuple, completion: tuple, ids: list[int], healed: str = "") -> tuple[int, ...]:
        """The tokens the previous keystroke's completion still suggests now: its prompt `before` and `completion`
        give the text the model expected after the old cursor; when the text before the new cursor is a start of
        it (the user typed what was suggested) and the rest starts with the text healing took off the new prompt
        (`healed`: the completion must start with it), that rest, tokenized. Drafts for the new request's first
        pass (`_pass`), so a suggestion the user is typing along comes back in one pass; () otherwise."""
        old, new = before[:self._before_cursor(before)], ids[:self._before_cursor(ids)]
        common = common_prefix(old, new)
        with self._tok_lock:
            expected = self.tokenizer.decode(list(old[common:]) + list(completion), skip_special_tokens=False)
            typed = self.tokenizer.decode(new[common:], skip_special_tokens=False)
            rest = expected[len(typed):]
            if not expected.startswith(typed) or not rest or not rest.startswith(healed):
                return ()
            return tuple(self.tokenizer.encode(rest, add_special_tokens=False))

    def _split_newcomers(self, group: _Group, newcomers: list[Generation]):
        """(joining, others): newcomers whose prompt is stored but for a few tokens join the next pass of the
        running rows with their stored columns (`_pass`), as (row, (n, layers)); the others are prefilled on their
        own, with their lookups' results. A newcomer joins while the pass stays under PASS_TOKENS rows x columns:
        a pass of 16 rows x 4 tokens costs about what a 16-row step and a 4-token prompt rest alone cost."""
        cache = self.prefix_cache
        looked = [(g, cache.lookup(group.key, g.prompt_ids) if cache.enabled else (0, None)) for g in newcomers]
        joining, others = [], []
        rows, width = len(group.batch), 1
        for g, (n, layers) in sorted(looked, key=lambda x: len(x[0].prompt_ids) - x[1][0]):
            rest = len(g.prompt_ids) - n
            if n and (rows + 1) * max(width, rest) <= PASS_TOKENS:
                joining.append((g, (n, layers)))
                rows, width = rows + 1, max(width, rest)
            else:
                others.append((g, (n, layers)))
        return joining, others

    def _drafts(self, g: Generation, limit: int, eager: bool = False) -> list[int]:
        """Up to `limit` prompt-lookup drafts (refact_lab.serve.speculative) for a running row: only for greedy
        rows, there the model's argmax at each drafted position is the token a plain step would pick (up to
        rounding, see `_picks`), so the output does not change. `eager`: as many as allowed every time, without
        the row's own measure of how many paid lately (`_pass` says when a wider pass costs little more)."""
        if limit <= 0 or self.speculative_tokens <= 0 or g.params.temperature > 0:
            return []
        if g.plain_steps > 0 and not eager:
            g.plain_steps -= 1
            return []
        if g.draft_tokens is None or eager:
            g.draft_tokens = self.speculative_tokens
        # no drafts past max_tokens, nor past the model's last position
        room = min(g.draft_tokens, limit, g.params.max_tokens - len(g.generated) - 1, g.route.n_ctx - g.pos - 1)
        return draft(g.prompt_ids + g.generated, room, history=g.history) if room > 0 else []

    def _pass(self, group: _Group, model, joining: list) -> bool:
        """One pass over the batch in which each running row is fed its last token and its drafts (speculative
        decoding), and each `joining` newcomer (`_split_newcomers`) the rest of its prompt and the drafts of what
        the user has not typed yet of the previous suggestion (`_typed_ahead`). False when there is nothing to
        join and too few rows have drafts to pay for the wider pass (the caller takes a plain step).

        Every token taken goes through `_advance` as in a plain step; the first one that finishes a row ends it.
        A row keeps the columns of the tokens fed before its new last token; the others become padding."""
        batch = group.batch
        running = list(batch.rows)
        rows = len(running) + len(joining)
        rests = [len(g.prompt_ids) - n for g, (n, _) in joining]
        width = max(rests, default=1)
        # Drafts fill the columns the newcomers' rests take anyway; with few rows they may widen the pass: a pass
        # of 3 tokens per row cost 1.1 plain steps at one row but 1.4-1.8 at 16 (measured on this project's CPU)
        cap = min(self.speculative_tokens, PASS_TOKENS // 2 // rows) if rows <= DRAFT_ROWS else 0
        if not joining and not cap:
            return False
        # A lone row in the bf16 copy drafts all it may every pass: there 9 tokens cost 1.15 one-token steps and 17
        # tokens 1.4 (fp32: 1.6 and 1.8; measured on this project's 2-core EPYC), so a miss costs little
        eager = rows == 1 and self.twin is not None and self.twin.wants_step(1)
        drafts = [self._drafts(g, max(width - 1, cap), eager) for g in running]
        if not joining and 10 * sum(bool(d) for d in drafts) < 4 * len(running):
            return False  # worth it when drafts come for at least 2 rows in 5 (about half of them are accepted)
        for (g, _), rest in zip(joining, rests):
            room = min(max(width - rest, cap), g.params.max_tokens - 1, g.route.n_ctx - len(g.prompt_ids) - 1)
            drafts.append(list(g.ahead[:max(0, room)]))
        if joining:
            batch.admit([g for g, _ in joining], [r for _, r in joining])
        feeds = [[g.last_token, *d] for g, d in zip(running, drafts)] + \
                [g.prompt_ids[n:] + d for (g, (n, _)), d in zip(joining, drafts[len(running):])]
        at = [0] * len(running) + [rest - 1 for rest in rests]  # where each row's first new token is predicted
        # as wide as a step of this many rows, or as long as a prompt the bf16 copy takes
        wide = self.twin is not None and (self.twin.wants_step(rows) or self.twin.wants_prompt(sum(map(len, feeds))))
        twin = self.twin if wide else None
        with self._adapter_contexts(model, group.key, twin):
            logits = batch.feed(model, feeds, self.decoder, twin, read_from=at)
        for i, ((g, _), rest) in enumerate(zip(joining, rests), start=len(running)):
            self.prefix_cache.store(group.key, g.prompt_ids, batch.prompt_kv(i, len(g.prompt_ids), rest))
        picks, accepted = self._picks(logits, batch.rows, at, drafts)
        finished, kept, taken_total = set(), [], 0
        for g, a, d, toks, n in zip(list(batch.rows), at, drafts, picks, accepted):
            if g.first_token_at is None:
                g.first_token_at = time.monotonic()
            start, reason, taken = g.pos, None, 0
            for i, tok in enumerate(toks):
                g.pos = start + a + 1 + i  # as after the plain steps (the n_ctx rule in _advance reads it)
                reason = self._advance(g, tok)
                taken += 1
                if reason or g.cancelled:
                    break
            g.pos = start
            taken_total += taken
            kept.append(a + taken)
            if d:
                with self._lock:
                    # a near tie cut the agreed drafts short (see `_picks`)
                    self.speculative.update(steps=1, drafted=len(d), accepted=n, ties=int(len(toks) <= n))
                # A pass over k drafts costs more than a plain step (in fp32 on a CPU, 9 tokens cost about 1.6
                # steps at one row): draft as many as were accepted last time plus one, twice as many after a full
                # hit, and after a miss take two plain steps before trying again (the text has moved on).
                g.draft_tokens = min(self.speculative_tokens, 2 * len(d) if n == len(d) else n + 1)
                g.plain_steps = MISS_PAUSE if n == 0 else 0
            if reason:
                self._finish(g, reason)
                finished.add(id(g))
        batch.settle(kept)
        with self._lock:
            # passes where rows of a batch drafted together (before, only a lone row drafted)
            self.speculative["shared"] += int(len(batch.rows) > 1 and any(drafts))
            self.counters["tokens"] += taken_total
            self.counters["joined"] += len(joining)  # newcomers that ran their prompt's rest in this pass
        if finished:
            batch.keep([i for i, r in enumerate(batch.rows) if id(r) not in finished])
        return True

    @staticmethod
    def _picks(logits, rows: list[Generation], at: list[int], drafts: list[list[int]]):
        """(picks, accepted): the tokens each row takes from a pass and how many of its drafts the model agreed
        with. Row i's first token comes from its column at[i], sampled as in a plain step (healing constrains a
        newcomer's); with drafts, then the model's choice after each draft it agreed with. Logits of one pass over
        several tokens round differently from one-token steps: where the best two are tied within two rounding
        steps of the logits' precision, a plain step might pick the other one, so no draft is taken from there
        on (bf16 only, in practice; its rounding makes a few texts differ anyway, as batching with other requests
        or a prompt computed in two parts already does)."""
        import torch

        firsts = sample(torch.stack([logits[i, a] for i, a in enumerate(at)]), rows)
        picks = [[tok] for tok in firsts]
        accepted = [0] * len(rows)
        tie = 2 * torch.finfo(logits.dtype).eps
        for i, (a, d) in enumerate(zip(at, drafts)):
            if not d:
                continue
            top = logits[i, a + 1:a + 1 + len(d)].float().topk(2, dim=-1)
            predicted = [firsts[i], *top.indices[:, 0].tolist()]
            close = ((top.values[:, 0] - top.values[:, 1]) <= tie * top.values[:, 0].abs().clamp(min=1)).tolist()
            n = accepted[i] = agreed(d, predicted)
            # predicted[j] (j >= 1) comes from column a + j, whose closeness is close[j - 1]
            sure = next((j for j in range(1, n + 1) if close[j - 1]), n + 1)
            picks[i] = predicted[:sure]
        return picks, accepted

    def _advance(self, g: Generation, tok: int) -> str | None:
        if tok in self._stop_ids:
            return "stop"
        g.generated.append(tok)
        g.last_token = tok
        g.first_allowed = None
        with self._tok_lock:
            text = self.tokenizer.decode(g.generated, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if g.healed and text.startswith(g.healed):
            text = text[len(g.healed):]  # the client typed that part already
        cut = g.rules.find(text)
        if cut is not None:
            # never take back streamed text (a loop is only seen once its third copy is complete)
            g.text = text[:max(cut, g.sent)]
            return "stop"
        g.text = text
        if len(g.generated) >= g.params.max_tokens or g.pos >= g.route.n_ctx:
            return "length"
        if not g.stream:
            return None
        safe = g.rules.safe_length(text)
        if safe > g.sent:
            self._emit(g, {"type": "text", "text": text[g.sent:safe]})
            g.sent = safe
        return None

    def _finish(self, g: Generation, reason: str) -> None:
        if reason in ("stop", "length") and g.params.temperature == 0 and g.generated:
            self.prefix_cache.remember(g.adapter_key, g.prompt_ids, g.generated)
        final = g.text.rstrip(REPLACEMENT_CHAR)
        if g.stream and len(final) > g.sent:
            self._emit(g, {"type": "text", "text": final[g.sent:]})
            g.sent = len(final)
        now = time.monotonic()
        record = {"id": g.id, "model": g.route.name, "adapter": g.adapter_key, "index": g.index,
                  "prompt_tokens": len(g.prompt_ids) + bool(g.healed), "completion_tokens": len(g.generated),
                  "finish_reason": reason, "text": final, "seconds": round(now - g.submitted, 4),
                  "time": time.time()}
        with self._lock:
            self.counters["finished"] += 1
            self.counters[f"finish_{reason}"] += 1
            self.records.append(record)
        self._emit(g, {"type": "done", **record})

    def _drop_cancelled(self, group: _Group) -> None:
        # Each flag is read once: a client may cancel at any moment (another thread), and a row cancelled
        # between two reads would leave the batch without being finished (no "done" event, not counted).
        gone = [i for i, g in enumerate(group.batch.rows) if g.cancelled]
        for i in gone:
            self._finish(group.batch.rows[i], "cancelled")
        if gone:
            group.batch.keep([i for i in range(len(group.batch.rows)) if i not in set(gone)])
        for g in [g for g in group.waiting if g.cancelled]:
            group.waiting.remove(g)
            self._finish(g, "cancelled")

    def _emit(self, g: Generation, event: Event) -> None:
        event.setdefault("index", g.index)
        try:
            g.sink(event)
        except Exception:  # a sink whose client has gone must not stop the batch
            g.cancelled = True

    def _emit_error(self, g: Generation, message: str) -> None:
        with self._lock:
            self.counters["errors"] += 1
        self._emit(g, {"type": "error", "message": message})

    def _fail_all(self, message: str) -> None:
        for group in list(self._groups.values()):
            for g in list(group.batch.rows) + list(group.waiting):
                self._emit_error(g, message)
        self._groups.clear()

    # ---- settings, model and adapters (scheduler thread) ----------------------------------------------------

    def _read_settings(self, force: bool = False) -> bool:
        """Re-read settings.json if it changed; returns whether it did."""
        try:
            st = os.stat(self.home.settings_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._settings_stamp and not force:
            return False
        self._settings_stamp = stamp
        old = self.choice
        # a part with a bad value keeps what was applied before (the defaults at the first read)
        choice, problems = state.load(self.home, self.overrides, previous=old)
        for part, message in problems.items():
            if self.settings_problems.get(part) != message:
                log.warning("ignoring invalid %s settings: %s", part, message)
        requested = model_config(choice, self.fallback_model)
        if self.entry is not None:
            # a hosted entry's model and placement are its own, not the flat fields (those are entry one's)
            e = self.entry
            requested = ModelConfig(e.model, e.placement, e.dtype, e.memory_share, e.max_batch)
            problems.pop(state.MODEL, None)
        from refact_lab.serve.fleet import lora_for

        # a LoRA deploys onto the hosted model it was trained from (off on the others)
        choice = lora_for(self.home, choice, self.entry, self.fallback_model)
        if state.MODEL in problems and self._requested is None:
            requested = None  # nothing valid to load yet: the engine reports the problem as its failure
        elif state.MODEL in problems:
            requested = self._requested
        with self._lock:
            self.choice = choice
            self.settings_problems = problems
            self._requested = requested
            if choice.lora != self.lora_choice:
                self.lora_choice = choice.lora
                self._lora_dirty = True  # resolve it at once
            if choice.part(state.UPSTREAM) != old.part(state.UPSTREAM):
                self._bump_caps()
        return True

    def _poll_settings(self) -> None:
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval:
            return
        self._last_poll = now
        self._read_settings()
        # best/latest follow new checkpoints of a running fine-tune, so they are re-resolved every few seconds
        rescan = self.lora_choice.mode in ("best", "latest") and now - self._last_rescan >= self.rescan_interval
        if self.state == "ready" and (self._lora_dirty or rescan):
            self._last_rescan = now
            self._lora_dirty = False
            self._apply_lora()

    def _bump_caps(self) -> None:
        # wall-clock based so a restarted server never goes back to a version a client already saw
        self.caps_version = max(self.caps_version + 1, int(time.time()))

    def _apply_lora(self) -> None:
        choice = self.lora_choice
        try:
            target = checkpoints.resolve(self.home, choice)
            if target is not None:
                self._load_adapter(target)
            error = None
        except Exception as e:
            log.warning("LoRA choice %s not applied: %s", choice.label(), e)
            error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            # For best/latest a failure is usually transient (a checkpoint being written): keep what was
            # deployed. A specific checkpoint that cannot load is not served at all, so nothing pretends to be it.
            target = self.deployed if choice.mode in ("best", "latest") else None
        with self._lock:
            changed = (target.key if target else None) != (self.deployed.key if self.deployed else None)
            self.deployed = target
            self.lora_error = error
            self.lora_applied = choice
            if changed:
                self._bump_caps()
                log.info("deployed LoRA: %s", target.key if target else "off")
        if changed:
            for key in list(self._adapter_names):
                if (target is None or key != target.key) and key not in self._groups:
                    self._unload_adapter(key)

    def _load_adapter(self, ck: checkpoints.Checkpoint) -> None:
        if ck.key in self._adapter_names:
            return
        from peft import PeftModel

        from refact_lab.models.loading import MODEL_LOADING

        name = f"lora{next(self._adapter_seq)}"
        with MODEL_LOADING:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(ck.path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(ck.path), adapter_name=name)
        self.model.eval()
        self._adapter_names[ck.key] = name
        if self.twin is not None:
            self.twin.model_for(self.model, fresh=True)  # copied again now, not on the next user's prompt

    def _unload_adapter(self, key: str) -> None:
        name = self._adapter_names.pop(key, None)
        if name is None:
            return
        try:
            if self._adapter_names:
                self.model.delete_adapter(name)
            else:
                # the last adapter: take the LoRA layers out entirely, so the base model runs exactly as loaded
                # (peft keeps pointing its active adapter at a deleted one otherwise)
                self.model = self.model.unload()
        except Exception:
            log.exception("could not unload adapter %s", key)
        if self.twin is not None:
            self.twin.model_for(self.model, fresh=True)  # copied again now, not on the next user's prompt

    def _adapter_context(self, model, key: str | None):
        import contextlib

        if not self._adapter_names:  # no adapter loaded: the plain model (and no peft import on the hot path)
            return contextlib.nullcontext()
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            return contextlib.nullcontext()
        if key is None:
            return model.disable_adapter()
        model.set_adapter(self._adapter_names[key])
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _adapter_contexts(self, model, key: str | None, twin=None):
        """`_adapter_context` for the model and, when a pass goes through it, the bf16 twin's copy of it."""
        with self._adapter_context(model, key):
            if twin is None:
                yield
            else:
                with self._adapter_context(twin.model_for(model), key):
                    yield

    def _apply_model(self, cfg: ModelConfig | None) -> None:
        import gc

        import torch

        from refact_lab.models.loading import MODEL_LOADING, auto_dtype, load_model, load_tokenizer
        from refact_lab.models.registry import resolve

        if cfg is None:
            with self._lock:
                self.state = "failed"
                self.error = self.settings_problems.get(state.MODEL, "settings.json has invalid serving settings")
            return
        with self._lock:
            self.state, self.error, self.config = "loading", None, cfg
            self.deployed = None
            self._adapter_names.clear()
            self.model = None
            self.decoder = None
            self.twin = None
            self.spec = None
            self._bump_caps()
        with self._tok_lock:
            self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        started = time.monotonic()
        try:
            from refact_lab.serve import fleet, memory_plan

            spec = resolve(cfg.model)
            with self._lock:
                self._loading_name = spec.name
            # an entry's placement in the engine's device words (gpu:N and share:N -> cuda:N, shard:N,M -> shard)
            device = fleet.engine_device(cfg.device) if self.entry is not None else cfg.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if device.startswith("cuda") or device == "shard":
                if not torch.cuda.is_available():
                    raise RuntimeError(f"device {cfg.device!r} needs a CUDA GPU and none is visible")
            if device.startswith("cuda") or device == "shard":
                # a per-process cap: only entry one (the single-model server's "share GPU") sets it; hosted
                # entries share one process, so their memory share is held by the memory plan instead
                if cfg.gpu_memory_fraction < 1.0 and self.entry is None:
                    for i in ([int(device.split(":")[1])] if ":" in device else range(torch.cuda.device_count())):
                        torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction, i)
            dtype = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[cfg.dtype]
            if dtype is None:
                dtype = auto_dtype(device, params=memory_plan.source_params(spec.source))
            # Refuse what cannot fit before loading, with the numbers (memory_plan.py). Planned and loaded under
            # the load lock, so two engines loading at once never both count the same free memory (nor import
            # transformers' lazy modules in two threads at once: that raised ImportError).
            with MODEL_LOADING:
                tokenizer = load_tokenizer(spec)
                placement = cfg.device if self.entry is not None else \
                    memory_plan.placement_of_device(device, cfg.gpu_memory_fraction)
                memory_plan.check_spec(self.entry.name if self.entry is not None else spec.name, spec, placement,
                                       cfg.dtype, cfg.max_batch, cfg.gpu_memory_fraction,
                                       weights_only=self.entry is None)
                if self.entry is not None and cfg.device.startswith("shard:"):
                    model = fleet.load_on_gpus(spec, state.placement_gpus(cfg.device), dtype)
                else:
                    model = load_model(spec, device="auto" if device == "shard" else device, dtype=dtype)
            stop_ids = set(spec.fim.stop_ids(tokenizer))
            eos = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
            for e in eos:
                stop_ids.update(e if isinstance(e, (list, tuple)) else [e] if isinstance(e, int) else [])
            n_ctx = spec.n_ctx
            max_pos = getattr(model.config, "max_position_embeddings", None)
            if isinstance(max_pos, int):
                n_ctx = min(n_ctx, max_pos)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            first = next(model.parameters())
            with self._lock:
                self.spec, self.model, self.n_ctx = spec, model, n_ctx
                self._stop_ids = stop_ids
                self._has_chat_template = bool(getattr(tokenizer, "chat_template", None))
                self.device_label = "shard: " + ", ".join(sorted({str(d) for d in model.hf_device_map.values()})) \
                    if device == "shard" and hasattr(model, "hf_device_map") else str(first.device)
                self.dtype_label = str(first.dtype).replace("torch.", "")
                self.weights_bytes = weights
                self.load_seconds = round(time.monotonic() - started, 2)
            vocabulary(tokenizer)  # token healing's index of the vocabulary, built once here rather than mid-request
            self._prepare_decoder(model, device)
            from refact_lab.serve.bf16_twin import Bf16Twin

            self.twin = Bf16Twin.for_model(model, device, dtype, cfg.dtype, self.decoder,
                                           remember=self.home.root / "bf16_twin.json")
            with self._tok_lock:
                self.tokenizer = tokenizer
            self._fim_markers = spec.fim.marker_ids(tokenizer)
            # the LoRA choice is applied before "ready", so the first request already sees the deployed adapter
            self._lora_dirty = False
            self._last_rescan = time.monotonic()
            self._apply_lora()
            with self._lock:
                self.state = "ready"
                self._bump_caps()
            log.info("model %s ready on %s in %.1fs", spec.name, self.device_label, self.load_seconds)
        except Exception as e:
            if self._stopping.is_set():
                # the server is shutting down mid-load (its thread pools refuse new work): not a model failure
                log.info("model %s: loading interrupted by shutdown", cfg.model)
                return
            log.exception("model %s failed to load", cfg.model)
            with self._lock:
                self.state, self.error = "failed", f"{type(e).__name__}: {e}"
                self.model = None
            # requests that waited for this model cannot be served
            while True:
                try:
                    self._emit_error(self._inbox.get_nowait(), f"the model failed to load: {self.error}")
                except queue.Empty:
                    break

    def _prepare_decoder(self, model, device: str) -> None:
        """The lean decode step, compiled and warmed up here when asked (auto: on a GPU), before "ready"."""
        from refact_lab.serve.decode_step import LeanDecoder

        compile = self.compile_decode == "on" or (self.compile_decode == "auto" and device.startswith("cuda"))
        decoder = None if device == "shard" else LeanDecoder.for_model(model, compile=compile)
        if decoder is not None and compile:
            decoder.warm_up()
            log.info("decode step compiled in %.1fs%s", decoder.compile_seconds,
                     f" (failed: {decoder.compile_error})" if decoder.compile_error else "")
        with self._lock:
            self.decoder = decoder

    def _memory(self) -> dict:
        out = {"weights_mb": round(self.weights_bytes / 2**20, 1) if self.weights_bytes else None}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["process_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        if self.device_label.startswith(("cuda", "shard")):  # torch is fully imported once a GPU model loaded
            import torch

            out["gpus"] = [{"device": f"cuda:{i}",
                            "allocated_mb": round(torch.cuda.memory_allocated(i) / 2**20, 1),
                            "reserved_mb": round(torch.cuda.memory_reserved(i) / 2**20, 1),
                            "total_mb": round(torch.cuda.get_device_properties(i).total_memory / 2**20, 1)}
                           for i in range(torch.cuda.device_count())]
        return out
