"""The registry of known base models: FIM tokens and their order, context length, LoRA targets, memory.

Training, the server and the IDE clients must agree on one FIM format per model, so it lives here only.
A model is named by a registry name ("default", "qwen2.5-coder-1.5b"), a hub id, or a local folder; `resolve`
turns any of those into a ModelSpec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_MODEL = "default"
EMBEDDED_DIR = Path(__file__).parent / "default"


@dataclass(frozen=True)
class FimFormat:
    """Fill-in-the-middle tokens and order. PSM = prefix, suffix, middle (what Qwen/StarCoder clients send)."""

    prefix: str
    suffix: str
    middle: str
    eot: str
    order: str = "psm"
    extra_stops: tuple[str, ...] = ()

    def layout(self, p, prefix, s, suffix, m):
        """The FIM order, written once: works on text and on token-id lists alike (models/prompt.py builds
        prompts with context through it)."""
        if self.order == "spm":
            return s + suffix + p + prefix + m
        return p + prefix + s + suffix + m

    def prompt(self, prefix: str, suffix: str) -> str:
        return self.layout(self.prefix, prefix, self.suffix, suffix, self.middle)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.prefix, self.suffix, self.middle, self.eot, *self.extra_stops)

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Text that always ends a code completion."""
        return tuple(dict.fromkeys(self.special_tokens))

    def marker_ids(self, tok) -> tuple[int, int, int] | None:
        """(prefix, suffix, middle) token ids when each marker is one token of this tokenizer, else None."""
        ids = tuple(token_id(tok, t) for t in (self.prefix, self.suffix, self.middle))
        return None if None in ids else ids

    def cursor_index(self, ids, markers: tuple[int, int, int]) -> int | None:
        """Where the text before the cursor ends in a FIM prompt's token ids (`markers`: `marker_ids`): at the
        suffix token (PSM) or at the final middle token (SPM); None when `ids` is not laid out so."""
        _, suffix_id, middle_id = markers
        if self.order == "psm":
            return ids.index(suffix_id) if suffix_id in ids else None
        return len(ids) - 1 if len(ids) and ids[-1] == middle_id else None

    def stop_ids(self, tok) -> list[int]:
        """Ids of the stop tokens this tokenizer has as single tokens."""
        return [i for i in (token_id(tok, t) for t in self.stop_tokens) if i is not None]


def token_id(tok, token: str) -> int | None:
    """The id of `token` when it is one token of this tokenizer (not mapped to the unknown token), else None."""
    i = tok.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and i != getattr(tok, "unk_token_id", None) else None


def content_ids(tok, text: str) -> list[int]:
    """Token ids of `text` as content. Source code may spell a special token ("<|endoftext|>" in a tokenizer's
    own code): here it stays text, where parsing it would end the document or open a FIM hole in mid-file."""
    if not text:
        return []
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def lead_ids(tok) -> list[int]:
    """The tokens this tokenizer puts before every text: a BOS for Llama-style models, none for Qwen's."""
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and ids[:1] == [bos] else []


QWEN_FIM = FimFormat("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>",
                     extra_stops=("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>"))
STARCODER_FIM = FimFormat("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>",
                          extra_stops=("<fim_pad>", "<file_sep>"))
DEEPSEEK_FIM = FimFormat("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<｜end▁of▁sentence｜>")
CODELLAMA_FIM = FimFormat("<PRE> ", " <SUF>", " <MID>", "</s>", extra_stops=(" <EOT>", "<EOT>"))


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # what the API and UI call it
    source: str               # hub id or local folder path
    fim: FimFormat
    n_ctx: int = 4096
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    memory_gb: float = 0.0    # rough bf16 weights size, for the hosting panel
    loss_threshold: float = 3.0  # the scan's default loss filter threshold (mean nats per token) for this model
    description: str = ""
    is_local: bool = False
    # whether snippets of other files laid out before the cursor's file help the model's completions (it was
    # trained to use them, and its scoreboard does not fall with them); "auto" repository context is on only
    # for such models (an explicit project in Deploy turns it on for any)
    repo_context: bool = True

    @property
    def is_embedded(self) -> bool:
        return self.name == DEFAULT_MODEL


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in [
        # n_ctx is what the embedded model was trained on: its held-out loss rises quickly beyond it.
        # Its losses run about one nat per token above a 1B+ model's on the same code, hence the higher threshold.
        # Its sixth stage learned the repository layout (cross-file names come back right twice as often with
        # context), but at 512 positions the snippets still cost more edit similarity than they bring (sqlglot
        # 26.0.0, 200 cursors: 0.250 off, 0.227 on), so "auto" leaves context off for it.
        ModelSpec(DEFAULT_MODEL, str(EMBEDDED_DIR), QWEN_FIM, n_ctx=512, memory_gb=0.03, is_local=True, loss_threshold=4.0,
                  repo_context=False, description="Small demo model shipped inside the package; works offline. Use a hub model for real work."),
        ModelSpec("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B", QWEN_FIM, n_ctx=32768, memory_gb=1.0,
                  description="Qwen2.5-Coder 0.5B base"),
        ModelSpec("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B", QWEN_FIM, n_ctx=32768, memory_gb=3.1,
                  description="Qwen2.5-Coder 1.5B base"),
        ModelSpec("qwen2.5-coder-7b", "Qwen/Qwen2.5-Coder-7B", QWEN_FIM, n_ctx=32768, memory_gb=15.2,
                  description="Qwen2.5-Coder 7B base"),
        ModelSpec("starcoder2-3b", "bigcode/starcoder2-3b", STARCODER_FIM, n_ctx=16384, memory_gb=6.1,
                  lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
                  description="StarCoder2 3B"),
        ModelSpec("starcoder2-7b", "bigcode/starcoder2-7b", STARCODER_FIM, n_ctx=16384, memory_gb=14.4,
                  lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
                  description="StarCoder2 7B"),
        ModelSpec("deepseek-coder-1.3b", "deepseek-ai/deepseek-coder-1.3b-base", DEEPSEEK_FIM, n_ctx=16384,
                  memory_gb=2.7, description="DeepSeek-Coder 1.3B base"),
        ModelSpec("codellama-7b", "codellama/CodeLlama-7b-hf", CODELLAMA_FIM, n_ctx=16384, memory_gb=13.5,
                  description="CodeLlama 7B"),
    ]
}

_FAMILY_BY_HUB_PREFIX = [
    ("qwen/", QWEN_FIM), ("bigcode/", STARCODER_FIM), ("deepseek-ai/", DEEPSEEK_FIM),
    ("codellama/", CODELLAMA_FIM), ("meta-llama/codellama", CODELLAMA_FIM),
]


def fim_from_vocabulary(tokens: set[str]) -> FimFormat | None:
    """Recognise a FIM format from the special tokens a tokenizer knows."""
    for fmt in (QWEN_FIM, STARCODER_FIM, DEEPSEEK_FIM):
        if {fmt.prefix, fmt.suffix, fmt.middle} <= tokens:
            eot = fmt.eot if fmt.eot in tokens else next((t for t in ("<|endoftext|>", "</s>", "<eos>") if t in tokens), fmt.eot)
            return replace(fmt, eot=eot, extra_stops=tuple(t for t in fmt.extra_stops if t in tokens))
    if {"▁<PRE>", "▁<SUF>", "▁<MID>"} <= tokens or {"<PRE>", "<SUF>", "<MID>"} <= tokens:
        return CODELLAMA_FIM
    return None


def _local_vocabulary(folder: Path) -> set[str]:
    tokens: set[str] = set()
    tj = folder / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        tokens |= {t["content"] for t in data.get("added_tokens", [])}
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        data = json.loads(tc.read_text(encoding="utf-8"))
        tokens |= {v["content"] for v in (data.get("added_tokens_decoder") or {}).values() if isinstance(v, dict)}
        tokens |= {t for t in data.get("additional_special_tokens") or [] if isinstance(t, str)}
    return tokens


def _local_n_ctx(folder: Path, fallback: int) -> int:
    cfg = folder / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            if isinstance(data.get(key), int):
                return min(data[key], 32768)
    return fallback


def resolve(name_or_path: str | None) -> ModelSpec:
    """A registry name, a hub id or a local folder → ModelSpec. Raises ValueError with a clear message."""
    name = (name_or_path or DEFAULT_MODEL).strip()
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    for spec in KNOWN_MODELS.values():
        if spec.source.lower() == name.lower():
            return spec
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a transformers model folder")
        fim = fim_from_vocabulary(_local_vocabulary(path))
        if fim is None:
            raise ValueError(
                f"{path}: its tokenizer has no FIM tokens (<|fim_prefix|>, <fim_prefix>, ...); "
                "a code-completion model needs them")
        return ModelSpec(path.resolve().name, str(path.resolve()), fim, n_ctx=_local_n_ctx(path, 4096),
                         is_local=True, description=f"local folder {path.resolve()}")
    if "/" in name and not name.startswith((".", "/", "~")):
        for prefix, fmt in _FAMILY_BY_HUB_PREFIX:
            if name.lower().startswith(prefix):
                return ModelSpec(name, name, fmt, description=f"hub model {name}")
        raise ValueError(f"{name}: unknown model family; its FIM tokens are not known. "
                         "Download it to a folder and pass the folder instead.")
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, a hub id or a local folder")
