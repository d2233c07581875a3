"""What is served, decided on disk: the contract between the panels (in a kernel) and the server's engine.

The Model hosting and Deploy panels run inside a Voilà or notebook kernel, a different process from the
jupyter_server that holds the model. They never reach into the server's memory. Instead:

1. **Choices live in `settings.json`** (the state directory's, written atomically and 0600 through
   `Home.update_settings`): the base model and where it runs (`model`, `device`, `dtype`,
   `gpu_memory_fraction`, `max_batch`: fields of `ServeSettings`), the deployed LoRA (`lora`: a `LoraChoice`),
   and upstream engines (`openai_api_key`, `openai_base_url`, `openai_models`, `upstream_url`,
   `upstream_api_key`, `upstream_models`). A restart of the server finds the same choices.
2. **The engine watches that file.** Its scheduler thread stats `settings.json` between decoding steps (at most
   every `poll_interval`, a cheap stat) and applies a change at a step boundary: a new LoRA choice loads the
   adapter and bumps `caps_version` without a restart; a new base model drains in-flight requests, then
   reloads. "best" and "latest" are re-resolved every few seconds too, so a run that writes a better
   checkpoint is picked up.
3. **Live state comes back over HTTP.** The services read the engine's state (loading / ready / failed with
   the reason, memory, deployed adapter, caps_version) from `GET /v1/refact-lab/status` with the token from
   `REFACT_LAB_TOKEN`, and the playground calls `POST /v1/completions`: the panel is just another API client.
   Without a server (a notebook on its own, the CLI), the services drive an in-process `Engine` that watches
   the same file, so the same code paths run.

**Several models at once.** `hosted` in settings.json lists the models served beside the first one (each a
`HostedModel`: name, model, placement, dtype, role, loaded); the first one is still the flat `model`, `device`,
... fields above, so a home without `hosted` serves exactly one model as before. `hosting_list` gives the
whole list, first entry included; `refact_lab.serve.fleet` runs one engine per loaded entry.

The file is the single source of truth; the HTTP status is a read-only view of how far the engine got in
applying it (`applied` vs `requested` in the status), which the services wait on after a change.

This module owns the file's serving part: `ServingChoice` is its typed form, `load` reads it (a bad value is
reported per part, never raised, so one bad field cannot stop the server) and `save` validates and writes it.
The engine, the hosting and deploy services and the CLI all go through these two functions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field

from refact_lab.config import ServeSettings, SettingsError, setting, validate
from refact_lab.home import Home, check_name

LORA_MODES = ("off", "best", "latest", "checkpoint")
LORA_SUFFIX = ":lora"  # the fine-tuned variant of base model B is served as "B:lora"


@dataclass(frozen=True)
class LoraChoice:
    """Which LoRA checkpoint is deployed.

    off: the base model only. best / latest: the best (lowest test loss) or the newest checkpoint of the most
    recent run (or of `run_id` when given). checkpoint: a specific `run_id` + `checkpoint` ("step-000200").
    """

    mode: str = "off"
    run_id: str | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise ValueError(f"lora: {self.mode!r} is not one of {', '.join(LORA_MODES)}")
        if self.run_id is not None:
            check_name(self.run_id, "run id")
        if self.checkpoint is not None:
            check_name(self.checkpoint, "checkpoint name")
        if self.mode == "checkpoint" and not (self.run_id and self.checkpoint):
            raise ValueError("lora: a specific checkpoint needs both a run id and a checkpoint name")

    @classmethod
    def parse(cls, text: str | None) -> "LoraChoice":
        """'off' | 'best' | 'latest' | 'RUN_ID' (its best) | 'RUN_ID/CHECKPOINT' (the CLI's --lora)."""
        text = (text or "off").strip()
        if text in ("off", "best", "latest"):
            return cls(text)
        if "/" in text:
            run_id, checkpoint = text.split("/", 1)
            return cls("checkpoint", run_id, checkpoint)
        return cls("best", run_id=text)

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        if self.mode == "off":
            return "off (base model only)"
        if self.mode == "checkpoint":
            return f"{self.run_id}/{self.checkpoint}"
        scope = f"run {self.run_id}" if self.run_id else "the latest run"
        return f"{self.mode} checkpoint of {scope}"


def lora_model_name(base: str) -> str:
    return f"{base}{LORA_SUFFIX}"


ROLES = ("completion", "chat", "none")
_PLACEMENT = re.compile(r"auto|cpu|gpu:\d+|shard:\d+(,\d+)+|share:\d+")
_HOSTED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def check_placement(text: str) -> str:
    if not isinstance(text, str) or not _PLACEMENT.fullmatch(text):
        raise SettingsError(f"placement: {text!r} is not auto, cpu, gpu:N, shard:N,M,... (two or more GPUs) "
                            "or share:N (a memory share of GPU N)")
    if text.startswith("shard:"):
        gpus = text[6:].split(",")
        if len(set(gpus)) != len(gpus):
            raise SettingsError(f"placement: {text!r} names a GPU twice")
    return text


def placement_gpus(placement: str) -> tuple[int, ...]:
    """The GPU indexes a placement uses (none for cpu and auto)."""
    if placement.startswith(("gpu:", "share:")):
        return (int(placement.split(":")[1]),)
    if placement.startswith("shard:"):
        return tuple(int(i) for i in placement[6:].split(","))
    return ()


def placement_label(device: str, gpu_memory_fraction: float = 1.0) -> str:
    """The first model's `device` setting in placement words (what the hosting list shows for entry one)."""
    if device.startswith("cuda"):
        index = device.split(":")[1] if ":" in device else "0"
        return f"share:{index}" if gpu_memory_fraction < 1.0 else f"gpu:{index}"
    return {"shard": "shard:all"}.get(device, device)


@dataclass(frozen=True)
class HostedModel:
    """One model the server hosts besides the first: what it is, where it runs and what it is the default for."""

    name: str = setting(help="The name API requests use in their `model` field (and NAME:lora for its LoRA)")
    model: str = setting(help="Registry name, hub id or local folder")
    placement: str = setting("auto", help="Where it runs: auto, cpu, gpu:N, shard:N,M,... (split over those GPUs) "
                                          "or share:N (on GPU N beside other models, within memory_share)")
    dtype: str = setting("auto", help="Weights precision", choices=("auto", "bf16", "fp16", "fp32"))
    role: str = setting("none", help="completion: the default for completions; chat: the default for chat; none",
                        choices=ROLES)
    memory_share: float = setting(1.0, help="share:N placement: the fraction of GPU N's memory this model may use "
                                            "(weights and KV cache)", min=0.05, max=1.0)
    max_batch: int = setting(ServeSettings.max_batch, help="Requests decoded together in one batch",
                             min=1, max=256)
    loaded: bool = setting(True, help="Whether the server runs it now (an unloaded entry stays in the list)")

    def __post_init__(self):
        validate(self)
        if not _HOSTED_NAME.fullmatch(self.name) or self.name.endswith(LORA_SUFFIX):
            raise SettingsError(f"name: {self.name!r} must be 1-128 letters, digits, '.', '_', '-' or '/', "
                                f"and not end in {LORA_SUFFIX}")
        if not self.model.strip():
            raise SettingsError("model: a registry name, hub id or folder is required")
        check_placement(self.placement)

    @classmethod
    def from_dict(cls, raw) -> "HostedModel":
        if not isinstance(raw, dict):
            raise SettingsError(f"hosted: expected an object per model, got {raw!r}")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"hosted: unknown keys {', '.join(sorted(unknown))}")
        try:
            return cls(**raw)
        except TypeError as e:  # a missing name or model
            raise SettingsError(f"hosted: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def gpus(self) -> tuple[int, ...]:
        return placement_gpus(self.placement)


def _hosted_value(raw) -> tuple[HostedModel, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise SettingsError(f"hosted: expected a list of models, got {raw!r}")
    entries = tuple(e if isinstance(e, HostedModel) else HostedModel.from_dict(e) for e in raw)
    names = [e.name for e in entries]
    for n in names:
        if names.count(n) > 1:
            raise SettingsError(f"hosted: the name {n!r} is used twice")
    for role in ("completion", "chat"):
        claims = [e.name for e in entries if e.role == role]
        if len(claims) > 1:
            raise SettingsError(f"hosted: only one model can have the {role} role ({', '.join(claims)} do)")
    return entries


# The parts of the serving choice: what a change of each means to the engine.
MODEL = "model"        # the base model and where it runs: a change reloads the model
LORA = "lora"          # the deployed adapter: loaded between steps
GUARD = "guard"        # per-request behaviour, read for every new request
UPSTREAM = "upstream"  # other engines proxied: a change moves caps_version
CONTEXT = "context"    # repository context for FIM prompts: read for every new request
HOSTED = "hosted"      # the models hosted beside the first: the fleet starts and stops their engines
PARTS = (MODEL, LORA, GUARD, UPSTREAM, CONTEXT, HOSTED)
CONTEXT_OFF = "off"
DEFAULT_CONTEXT_TOKENS = 1024


def _serve_default(name: str):
    return ServeSettings.__dataclass_fields__[name].default


def _in(part: str, default=None):
    return field(default=default, metadata={"part": part})


@dataclass(frozen=True)
class ServingChoice:
    """The serving choice kept in settings.json (a flat JSON object; `lora` is a nested object).

    The model part's values and bounds are `ServeSettings`' (the same field metadata drives the CLI and the
    Model hosting form); `model` None means "the server's --model, else the default model".
    """

    model: str | None = _in(MODEL)
    device: str = _in(MODEL, _serve_default("device"))
    dtype: str = _in(MODEL, _serve_default("dtype"))
    gpu_memory_fraction: float = _in(MODEL, _serve_default("gpu_memory_fraction"))
    max_batch: int = _in(MODEL, _serve_default("max_batch"))
    lora: LoraChoice = _in(LORA, LoraChoice())
    loop_guard: bool = _in(GUARD, _serve_default("loop_guard"))
    openai_api_key: str | None = _in(UPSTREAM)
    openai_base_url: str | None = _in(UPSTREAM)
    openai_models: tuple[str, ...] | None = _in(UPSTREAM)
    upstream_url: str | None = _in(UPSTREAM)
    upstream_api_key: str | None = _in(UPSTREAM)
    upstream_models: tuple[str, ...] | None = _in(UPSTREAM)
    # project whose index gives FIM prompts context from other files; "off"; None: the deployed run's project
    context: str | None = _in(CONTEXT)
    context_tokens: int = _in(CONTEXT, DEFAULT_CONTEXT_TOKENS)   # at most this many prompt tokens of context
    hosted: tuple[HostedModel, ...] = _in(HOSTED, ())   # the models hosted beside the first (entry one)

    def __post_init__(self):
        # the model part is checked by ServeSettings (bounds, choices, device syntax): one set of rules
        checked = ServeSettings(**{k: v for k, v in self.part(MODEL).items() if v is not None})
        for name in fields_of(MODEL):  # as ServeSettings converted them (4.0 -> 4)
            object.__setattr__(self, name, getattr(checked, name))
        if not isinstance(self.lora, LoraChoice):
            raise SettingsError(f"lora: expected a LoRA choice, got {self.lora!r}")
        if not isinstance(self.loop_guard, bool):
            raise SettingsError(f"loop_guard: expected true or false, got {self.loop_guard!r}")
        if self.context is not None and self.context != CONTEXT_OFF:
            check_name(self.context, "context project")
        if isinstance(self.context_tokens, bool) or not isinstance(self.context_tokens, int) \
                or not 0 <= self.context_tokens <= 32768:
            raise SettingsError(f"context_tokens: expected a whole number from 0 to 32768, got {self.context_tokens!r}")
        object.__setattr__(self, "hosted", _hosted_value(self.hosted))
        for name in fields_of(UPSTREAM):
            value = getattr(self, name)
            if name.endswith("_models"):
                if value is not None and not (isinstance(value, (list, tuple))
                                              and all(isinstance(m, str) for m in value)):
                    raise SettingsError(f"{name}: expected a list of model names, got {value!r}")
                object.__setattr__(self, name, tuple(value) if value else None)
            elif value is not None and not isinstance(value, str):
                raise SettingsError(f"{name}: expected text, got {value!r}")

    def part(self, name: str) -> dict:
        return {k: getattr(self, k) for k in fields_of(name)}

    def to_settings(self) -> dict:
        """The JSON form (None values are left out, as settings.json leaves them out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, LoraChoice):
                value = value.to_dict()
            elif f.name == "hosted":
                value = [e.to_dict() for e in value] or None
            elif isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[f.name] = value
        return out


def fields_of(part: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ServingChoice) if f.metadata["part"] == part)


def _lora_value(raw) -> LoraChoice:
    if raw is None or isinstance(raw, LoraChoice):
        return raw or LoraChoice()
    if isinstance(raw, str):
        return LoraChoice.parse(raw)
    if isinstance(raw, dict):
        unknown = set(raw) - {"mode", "run_id", "checkpoint"}
        if unknown:
            raise ValueError(f"lora: unknown keys {', '.join(sorted(unknown))}")
        return LoraChoice(raw.get("mode", "off"), raw.get("run_id"), raw.get("checkpoint"))
    raise ValueError(f"lora: expected 'off', 'best', 'latest', 'RUN' or 'RUN/CHECKPOINT', got {raw!r}")


def parse(data: dict, previous: ServingChoice | None = None) -> tuple[ServingChoice, dict[str, str]]:
    """The serving choice in a settings dict, part by part: a part with a bad value keeps `previous`' (or the
    default) and is reported in the returned problems ({part: "field: what is wrong"})."""
    base = previous or ServingChoice()
    values: dict = {}
    problems: dict[str, str] = {}
    for part in PARTS:
        wanted = {k: data.get(k) for k in fields_of(part)}
        try:
            if part == LORA:
                wanted["lora"] = _lora_value(wanted["lora"])
            elif part == GUARD and wanted["loop_guard"] is None:
                wanted["loop_guard"] = _serve_default("loop_guard")
            elif part == CONTEXT and wanted["context_tokens"] is None:
                wanted["context_tokens"] = DEFAULT_CONTEXT_TOKENS
            elif part == HOSTED:
                wanted["hosted"] = _hosted_value(wanted["hosted"])
            elif part == MODEL:
                wanted = {k: v if v is not None or k == "model" else getattr(ServingChoice(), k)
                          for k, v in wanted.items()}
            ServingChoice(**wanted)  # this part alone, checked
        except (ValueError, TypeError) as e:
            problems[part] = f"settings.json: {e}"
            wanted = base.part(part)
        values.update(wanted)
    return ServingChoice(**values), problems


def load(home: Home, overrides: dict | None = None,
         previous: ServingChoice | None = None) -> tuple[ServingChoice, dict[str, str]]:
    """settings.json's serving choice (with `overrides`, e.g. the CLI's one-off --model, on top) and its problems.
    A file that is not JSON is one problem of every part."""
    try:
        data = home.load_settings()
    except ValueError as e:
        base = previous or ServingChoice()
        problems = {part: str(e) for part in PARTS}   # the message names the file and what is wrong
        data = {**base.to_settings(), **(overrides or {})}
        choice, more = parse(data, base)
        return choice, {**problems, **more}
    return parse({**data, **(overrides or {})}, previous)


def load_checked(home: Home, overrides: dict | None = None) -> ServingChoice:
    """settings.json's serving choice for a command, which must not go on with values it cannot read: a
    SettingsError naming the file and every problem, on one line. (The engine uses `load` and keeps running.)"""
    choice, problems = load(home, overrides)
    if problems:
        raise SettingsError("; ".join(dict.fromkeys(problems.values())))   # an unreadable file: once, not per part
    return choice


def active_model(home: Home) -> str:
    """The base model settings.json chooses (what scan, fine-tuning and the scoreboard default to). A damaged
    settings.json is a SettingsError, as for every command that reads it: the default model in place of an
    unreadable choice would scan, train or judge with a model nobody chose."""
    return load_checked(home).model or "default"


def save(home: Home, **changes) -> ServingChoice:
    """Validate these fields (SettingsError / ValueError naming the field) and write them; None removes one.
    Fields not named keep what the file says, even a bad value (it stays reported by `load`)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(ServingChoice)}
    if unknown:
        raise SettingsError(f"not a serving setting: {', '.join(sorted(unknown))}")
    current, _ = load(home)
    removed = {k for k, v in changes.items() if v is None}
    values = {k: ServingChoice.__dataclass_fields__[k].default if k in removed else v for k, v in changes.items()}
    if "lora" in values:
        values["lora"] = _lora_value(values["lora"])
    if "hosted" in values:
        values["hosted"] = _hosted_value(values["hosted"])
    checked = dataclasses.replace(current, **values)
    stored = checked.to_settings()
    home.update_settings(**{k: None if k in removed else stored.get(k) for k in changes})
    return checked


# ---- the hosting list -------------------------------------------------------------------------------------

FIRST = "first"   # the hosting list's entry one is the flat model fields; its `source` says so


def first_entry(choice: ServingChoice, fallback_model: str | None = None) -> dict:
    """Entry one of the hosting list (the flat model fields), in the list's shape. Its role: completion, unless
    another entry claims that role; chat when no other entry claims chat either would be a guess, so none."""
    claimed = {e.role for e in choice.hosted}
    return {"name": choice.model or fallback_model or "default", "model": choice.model or fallback_model or "default",
            "placement": placement_label(choice.device, choice.gpu_memory_fraction), "dtype": choice.dtype,
            "role": "none" if "completion" in claimed else "completion",
            "memory_share": choice.gpu_memory_fraction, "max_batch": choice.max_batch, "loaded": True,
            "source": FIRST}


def hosting_list(home: Home, fallback_model: str | None = None) -> list[dict]:
    """Every hosted model as settings.json says: entry one (the first model), then `hosted`."""
    choice, _ = load(home)
    return [first_entry(choice, fallback_model)] + [{**e.to_dict(), "source": HOSTED} for e in choice.hosted]


def hosted_entries(home: Home) -> tuple[HostedModel, ...]:
    return load(home)[0].hosted


def save_hosted(home: Home, entries) -> tuple[HostedModel, ...]:
    """Validate and write the `hosted` list (entries two and on); an empty list removes it."""
    return save(home, hosted=tuple(entries) or None).hosted
