"""Settings dataclasses shared by the UI, the CLI and the engines.

Each concern has one dataclass (ServeSettings here; ScanSettings and FinetuneSettings beside it). A field is
declared with `setting(...)`, whose metadata (help text, bounds, choices) drives the CLI's `--set key=value`
parsing and help, the validation in `__post_init__`, and the widgets of the UI forms, so none of them repeats
the others.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the field and what is allowed."""


def setting(default: Any = dataclasses.MISSING, *, help: str, min: float | None = None,
            max: float | None = None, choices: tuple | None = None, auto: bool = False,
            default_factory: Any = dataclasses.MISSING, label: str | None = None):
    """A dataclass field with its help text and bounds.

    `auto=True` means the value may be None, read as "derive it automatically" (shown as "auto").
    `label` is what forms show (default: derived from the name by `field_label`).
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "auto": auto, "label": label}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _field_type(cls, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    t = hints.get(f.name, str)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if args and typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        t = args[0]
    return typing.get_origin(t) or t


def validate(obj: Any) -> None:
    """Check every field of a settings dataclass against its metadata; raise SettingsError on the first bad one."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        meta = f.metadata
        if "help" not in meta:
            continue
        value = getattr(obj, f.name)
        if value is None:
            if meta.get("auto") or f.default is None:
                continue
            raise SettingsError(f"{f.name}: a value is required ({meta['help']})")
        t = _field_type(cls, f)
        if t is bool and not isinstance(value, bool):
            raise SettingsError(f"{f.name}: expected true or false, got {value!r}")
        if t in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SettingsError(f"{f.name}: expected a number, got {value!r}")
        if t in (int, float) and not math.isfinite(value):
            # nan passes every bound check (each comparison is false) and inf has no place in a setting
            raise SettingsError(f"{f.name}: expected a finite number, got {value!r}")
        if t is int and isinstance(value, float) and not value.is_integer():
            raise SettingsError(f"{f.name}: expected a whole number, got {value!r}")
        if t is int and isinstance(value, float):
            object.__setattr__(obj, f.name, int(value))
            value = int(value)
        if t is float and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))
        if t is str and not isinstance(value, str):
            raise SettingsError(f"{f.name}: expected text, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise SettingsError(f"{f.name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta.get("min") is not None and value < meta["min"]:
            raise SettingsError(f"{f.name}: {value} is below the minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise SettingsError(f"{f.name}: {value} is above the maximum {meta['max']}")


def parse_value(cls, name: str, text: str) -> Any:
    """Turn the text of a `--set name=value` into the field's type ("auto" means None for auto fields)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise SettingsError(f"unknown setting {name!r}; known: {', '.join(sorted(fields))}")
    f = fields[name]
    if not text.strip():
        # an empty value is a slip (an unset shell variable), not a choice: say how to ask for the default
        how = f"write {name}=auto for the automatic value" if f.metadata.get("auto") else \
            "leave the setting out to keep its default"
        raise SettingsError(f"{name}: the value is empty; {how}")
    if text.strip().lower() in ("auto", "none") and (f.metadata.get("auto") or f.default is None):
        return None
    t = _field_type(cls, f)
    try:
        if t is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            return int(float(text)) if float(text).is_integer() else float(text)
        if t is float:
            return float(text)
        if t in (list, tuple):
            return [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise SettingsError(f"{name}: cannot read {text!r} as {t.__name__}") from None
    return text


def with_overrides(obj, pairs: list[str]):
    """Return a copy of a settings object with `key=value` strings applied and validated."""
    changes = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SettingsError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        changes[key.strip()] = parse_value(type(obj), key.strip(), value)
    return dataclasses.replace(obj, **changes)


# Words of field names that a form spells differently (abbreviations and units).
_LABEL_WORDS = {"lm": "LM", "lora": "LoRA", "lr": "LR", "gpu": "GPU", "fim": "FIM", "mem": "memory",
                "seq": "sequence", "len": "length", "kib": "(KiB)", "mb": "(MiB)", "dup": "duplicate"}


def field_label(name: str, label: str | None = None) -> str:
    """The human label of a field: its `label` metadata, else derived from the name
    (`lr_decay_steps` -> "LR decay steps", `low_gpu_mem_mode` -> "Low GPU memory mode")."""
    if label:
        return label
    words = [_LABEL_WORDS.get(w, w) for w in name.split("_") if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def field_specs(cls) -> list[dict]:
    """Field descriptions for building a form or a help table: name, label, type, default, help, bounds,
    choices."""
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        spec = {"name": f.name, "type": _field_type(cls, f), "default": default, **f.metadata}
        spec["label"] = field_label(f.name, f.metadata.get("label"))
        out.append(spec)
    return out


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict):
    """Build settings from a dict (e.g. a saved settings.json), ignoring keys this version does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in known})


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeSettings:
    """How `refact-lab serve` runs: one jupyter_server with the app, JupyterLab and the inference API."""

    host: str = setting("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)")
    port: int = setting(8008, help="Port for the app, JupyterLab and the API", min=1, max=65535)
    home: str | None = setting(None, help="State directory (default: $REFACT_LAB_HOME or ~/.refact_lab)")
    token: str | None = setting(None, help="API and login token (default: generated and printed at start)")
    no_auth: bool = setting(False, help="Disable the token (only allowed on a loopback address)")
    model: str | None = setting(None, help="Base model to serve: a registry name, a hub id or a local folder")
    max_body_mb: int = setting(16, help="Largest request body accepted by the API, in MiB", min=1, max=1024)
    device: str = setting("auto", help="Where the model runs: auto (a GPU if there is one, else the CPU), cpu, "
                                       "cuda or cuda:N (one GPU), shard (split over every GPU)")
    dtype: str = setting("auto", help="Weights precision: auto (bf16 on a GPU, or on a CPU with AMX / AVX512-BF16; else "
                                    "fp32)",
                         choices=("auto", "bf16", "fp16", "fp32"))
    gpu_memory_fraction: float = setting(
        1.0, help="Share one GPU: the fraction of its memory this server may use (the rest stays free for "
                  "another model or process)", min=0.05, max=1.0)
    max_batch: int = setting(16, help="Requests decoded together in one batch on the model", min=1, max=256)
    load_wait_s: float = setting(120.0, help="Seconds a request that needs the model waits while it loads (the server "
                                             "just started, or another model was chosen) before a 503", min=0,
                                 max=3600)
    loop_guard: bool = setting(True, help="Stop a completion that repeats one piece of text three times in a row "
                                          "and keep only the first copy (unless the code around the cursor "
                                          "repeats it too)")
    prefix_cache_mib: int = setting(256, help="Memory for the KV of recent prompts, so a request that starts like a "
                                              "recent one (the next keystroke) only computes what is new (0: off)",
                                    min=0, max=65536)
    speculative_tokens: int = setting(8, help="Tokens guessed from the prompt and the text so far, checked in one pass "
                                              "of the model, for greedy requests: code repeats itself, so "
                                              "several tokens come per step, with the same output (0: off)",
                                      min=0, max=64)
    compile_decode: str = setting("auto", help="Compile the decode step with torch.compile, at model load: on, off, "
                                               "or auto (on with a GPU; off on a CPU, where it gains about a "
                                               "fifth for tens of seconds of compiling at every load)",
                                  choices=("auto", "on", "off"))

    def __post_init__(self):
        validate(self)
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|shard", self.device):
            raise SettingsError(f"device: {self.device!r} is not auto, cpu, cuda, cuda:N or shard")
        if self.no_auth and not is_loopback(self.host):
            raise SettingsError(
                f"--no-auth is refused on {self.host}: anyone on the network could use the server. "
                "Use a token, or listen on 127.0.0.1.")
        if self.no_auth and self.token:
            raise SettingsError("--token and --no-auth cannot be used together")


@dataclass
class FinetuneSettings:
    """Hyperparameters of one LoRA fine-tuning run: the panel's form, `--set key=value` and the trainer read this.

    Fields marked auto (None) are derived from the dataset size and the model's context by
    `refact_lab.finetune.schedule.resolve`, which also explains the numbers it chose.
    """

    # LoRA
    lora_r: int = setting(16, help="LoRA rank: size of the low-rank update; larger learns more, costs more memory",
                          min=1, max=512)
    lora_alpha: float = setting(32.0, help="LoRA alpha: the update is scaled by alpha / r", min=0.01, max=4096)
    lora_init_scale: float = setting(
        1.0, help="Multiplies the random initial LoRA A matrix (B starts at zero, so the model starts unchanged); "
                  "smaller values make the first steps gentler", min=1e-6, max=100)
    lora_dropout: float = setting(0.05, help="Dropout on the LoRA input during training", min=0.0, max=0.9)
    # optimisation
    learning_rate: float = setting(3e-4, help="Peak learning rate of AdamW (reached after warmup)", min=1e-7, max=1.0)
    batch_size: int = setting(8, help="Packed sequences per optimizer step, over all processes", min=1, max=8192)
    micro_batch_size: int | None = setting(
        None, auto=True, help="Sequences per forward pass in each process; gradients are accumulated up to "
                              "batch_size (auto: the whole per-process batch at once)", min=1, max=8192)
    warmup_steps: int | None = setting(
        None, auto=True, help="Steps of linear learning-rate warmup (auto: 5% of train steps, at most 100)",
        min=0, max=1_000_000)
    weight_decay: float = setting(0.01, help="AdamW weight decay on the LoRA matrices", min=0.0, max=1.0)
    train_steps: int | None = setting(
        None, auto=True, help="Optimizer steps in the run (auto: `epochs` passes over the training tokens)",
        min=1, max=10_000_000)
    lr_decay_steps: int | None = setting(
        None, auto=True, help="Steps over which the learning rate decays (cosine) to 10% of its peak "
                              "(auto: equal to train steps)", min=1, max=10_000_000)
    epochs: float = setting(2.0, help="Passes over the training data that 'auto' train steps cover",
                            min=0.01, max=1000)
    low_gpu_mem_mode: bool = setting(
        False, help="Gradient checkpointing: recompute activations in the backward pass (less memory, ~30% slower). "
                    "Turned on automatically if the GPU runs out of memory")
    precision: str = setting("auto", help="auto: bf16 autocast where the hardware supports it, else fp32",
                             choices=("auto", "bf16", "fp32"))
    # data
    seq_len: int | None = setting(
        None, auto=True, help="Tokens per packed training sequence, at most the model's context (auto: the "
                              "smaller of 1024 and the model's context)", min=32, max=131072)
    fim_rate: float = setting(0.9, help="Share of examples in fill-in-the-middle form; the rest are plain text",
                              min=0.0, max=1.0)
    context_rate: float = setting(
        0.0, help="Share of training files whose examples carry snippets retrieved from other training files of "
                  "the project, laid out as served, so the model learns to use repository context (off by "
                  "default until the scoreboard shows it helps)",
        min=0.0, max=1.0, label="Repository context rate")
    max_test_rows: int = setting(64, help="At most this many packed test sequences are evaluated (keeps "
                                          "evaluation quick)", min=1, max=100_000)
    # bookkeeping
    eval_every: int | None = setting(
        None, auto=True, help="Measure the test loss every N steps (auto: about 20 evaluations over the run)",
        min=1, max=10_000_000)
    checkpoint_every: int | None = setting(
        None, auto=True, help="Save a checkpoint every N steps, also whenever the test loss improves, on stop and "
                              "at the end (auto: every second evaluation)", min=1, max=10_000_000)
    early_stop_patience: int = setting(
        5, help="Stop after this many evaluations without a lower test loss (0: never stop early)",
        min=0, max=100_000)
    seed: int = setting(42, help="Random seed for LoRA init, data order and FIM splits", min=0, max=2**31 - 1)
    # judging (refact_lab.scoreboard)
    eval_cursors: int = setting(
        50, help="When the run finishes, complete this many held-out cursors with its best checkpoint and the base "
                 "model, through the served engine (the scoreboard; 0: off)", min=0, max=5000)
    best_by: str = setting(
        "test_loss", help="Which checkpoint is 'best': the lowest test loss, or the highest scoreboard edit "
                          "similarity among the lowest-loss ones (needs eval_cursors > 0)",
        choices=("test_loss", "edit_similarity"))

    def __post_init__(self):
        validate(self)
        if self.micro_batch_size is not None:
            if self.micro_batch_size > self.batch_size:
                raise SettingsError(f"micro_batch_size: {self.micro_batch_size} is larger than batch_size "
                                    f"{self.batch_size}")
            if self.batch_size % self.micro_batch_size:
                raise SettingsError(f"batch_size: {self.batch_size} is not a multiple of micro_batch_size "
                                    f"{self.micro_batch_size}")
        if self.train_steps is not None and self.warmup_steps is not None and self.warmup_steps >= self.train_steps:
            raise SettingsError(f"warmup_steps: {self.warmup_steps} must be smaller than train_steps "
                                f"{self.train_steps}")


@dataclass
class LaunchSettings:
    """How a fine-tuning run is launched: processes, devices, FSDP. `refact-lab finetune --processes --gpus --cpu
    --fsdp`, the Fine-tune panel's device controls and the run's settings.json ("launch") read this.
    `batch_size` stays the global batch: each process trains batch_size / processes rows of every step."""

    processes: int | None = setting(None, auto=True, min=1, max=64,
                                    help="Training processes (auto: one per chosen GPU, 1 on the CPU)")
    gpus: list[int] | None = setting(None, auto=True, label="GPUs",
                                     help="GPU ids to train on, e.g. 0,1 (CUDA_VISIBLE_DEVICES of the run; "
                                          "auto: every visible GPU)")
    cpu: bool = setting(False, label="CPU", help="Train on the CPU even where GPUs are present (several "
                                                 "processes talk through gloo)")
    fsdp: bool = setting(False, label="FSDP", help="Shard the base model over the GPUs with FSDP (accelerate): "
                                                   "for models that do not fit one GPU even for LoRA")

    def __post_init__(self):
        if isinstance(self.gpus, str):   # the CLI and text fields give "0,1"
            parts = [p.strip() for p in self.gpus.split(",") if p.strip()]
            try:
                self.gpus = [int(p) for p in parts]
            except ValueError:
                raise SettingsError(f"gpus: expected GPU ids like 0,1, got {self.gpus!r}") from None
        if self.gpus is not None:
            self.gpus = list(self.gpus)
            if not self.gpus or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in self.gpus):
                raise SettingsError(f"gpus: expected GPU ids like 0,1, got {self.gpus!r}")
            if len(set(self.gpus)) != len(self.gpus):
                raise SettingsError(f"gpus: {self.gpus} names a GPU twice")
        validate(self)
        if self.cpu and self.gpus:
            raise SettingsError("gpus: cannot be chosen together with cpu")
        if self.cpu and self.fsdp:
            raise SettingsError("fsdp: shards over GPUs; it cannot be used with cpu")

    @property
    def process_count(self) -> int:
        """The processes asked for: the number, else one per chosen GPU, else 1 (on a machine's every GPU,
        finetune.memory.plan_launch settles "auto")."""
        return self.processes or (len(self.gpus) if self.gpus and not self.cpu else 1)


@dataclass
class ScanSettings:
    """How sources are filtered into a dataset: the Scan panel's form, `refact-lab scan` and the pipeline read this.

    Stage 1 applies rules (no model); stage 2 computes a per-file loss with the base model; then the split.
    """

    # stage 1: rules
    max_file_kib: int = setting(512, help="Files larger than this (KiB) are rejected as too_large",
                                min=1, max=1_048_576, label="Max file size (KiB)")
    digit_share: float = setting(0.3, help="Files whose share of digits among non-space characters is above this "
                                           "are rejected as lots_of_digits (data tables, hex dumps)",
                                 min=0.0, max=1.0, label="Max share of digits")
    include: list[str] = setting(default_factory=list, label="Include patterns",
                                 help="Gitignore-style patterns a file must match to be kept (empty: every file)")
    exclude: list[str] = setting(default_factory=list, label="Exclude patterns",
                                 help="Gitignore-style patterns of files to reject as excluded_by_mask "
                                      "(e.g. tests/, *.sql, !keep.sql)")
    file_types: list[str] | None = setting(
        None, auto=True, help="Languages to keep, e.g. Python, TypeScript (auto: the most common programming "
                              "language found in the sources)")
    near_dup: bool = setting(False, help="Also reject near-duplicates (MinHash similarity), not only exact copies",
                             label="Reject near-duplicates")
    near_dup_threshold: float = setting(0.85, help="Estimated Jaccard similarity above which a file is a "
                                                   "near-duplicate of one kept before it", min=0.5, max=1.0,
                                        label="Near-duplicate similarity")
    secrets: str = setting("reject", choices=("reject", "redact", "off"), label="Files with secrets",
                           help="Files holding credentials (keys, tokens, passwords): reject them as secret, "
                                "redact (train on a copy with each secret replaced by a placeholder), or off")
    # stage 2: language model
    lm_filter: bool = setting(True, help="Stage 2: compute each file's loss under the base model and reject "
                                         "files above the threshold", label="Loss filter (stage 2)")
    model: str | None = setting(None, help="Base model for the loss filter: a registry name, hub id or local "
                                           "folder (default: the active or embedded model)",
                                label="Loss filter model")
    loss_threshold: float | None = setting(None, auto=True, min=0.0, max=100.0, help=(
        "Files whose mean per-token loss is above this are rejected as loss_too_high; auto: the model's own "
        "threshold from the registry (3.0 for hub models; the small embedded model is less sure of itself)"))
    lm_batch_size: int = setting(8, help="Files per forward pass in the loss filter", min=1, max=1024,
                                 label="Loss filter batch size")
    lm_max_tokens: int = setting(1024, help="Tokens of each file (from its start) that the loss is measured on",
                                 min=16, max=131072, label="Tokens per file (loss)")
    # split
    test_share: float = setting(0.05, help="Share of accepted files held out as the automatic test set when no "
                                           "source or file is marked test", min=0.0, max=0.5)
    max_test_files: int = setting(20, help="At most this many files in the automatic test set", min=1,
                                  max=100_000)
    seed: int = setting(42, label="Split seed", help="Seed of the automatic train/test split (same seed, same split)",
                        min=0, max=2**31 - 1)
    # speed
    workers: int | None = setting(None, auto=True, help="Processes reading files in stage 1 (auto: one per "
                                                        "available core, at most 8, for large scans; else 1)", min=1, max=64,
                                  label="Reader processes")

    def __post_init__(self):
        # The CLI and text fields give comma-separated strings; the pipeline wants lists.
        for name in ("include", "exclude", "file_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [p.strip() for p in value.split(",") if p.strip()])
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
        validate(self)
        for name in ("include", "exclude", "file_types"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise SettingsError(f"{name}: expected a list of text, got {value!r}")
        if self.file_types == []:
            self.file_types = None
        import pathspec  # here, not at module level: config is imported by every command

        for name in ("include", "exclude"):
            try:
                pathspec.GitIgnoreSpec.from_lines(getattr(self, name))
            except Exception as e:  # pathspec raises several types for a malformed pattern
                raise SettingsError(f"{name}: invalid pattern ({e})") from None


@dataclass
class UpdateSchedule:
    """Scheduled update-and-retrain (refact_lab.keep_current): kept in settings.json under "update_schedule",
    set from the Settings panel; the server launches `refact-lab update` for `project` when one is due."""

    every_hours: int = setting(0, min=0, max=24 * 365, label="Update every (hours)",
                               help="Hours between scheduled updates of the project (0: off)")
    project: str = setting("default", help="The project the scheduled update fetches, rescans, retrains and judges")

    def __post_init__(self):
        validate(self)
        from refact_lab.home import check_name

        try:   # a folder name: "../x" was accepted here and then warned at every tick of the server
            check_name(self.project, "project")
        except ValueError as e:
            raise SettingsError(f"project: {e}") from None
