"""Build a byte-level BPE tokenizer with FIM special tokens, saved as a standard `tokenizer.json`.

Used by the embedded default model's recipe and by tests and benches that need a tiny model made on the fly
(no model hub is reachable). The special tokens follow Qwen2.5-Coder's names so the same FIM format applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from refact_lab.models.registry import QWEN_FIM

SPECIAL_TOKENS = [QWEN_FIM.eot, QWEN_FIM.prefix, QWEN_FIM.middle, QWEN_FIM.suffix, "<|fim_pad|>",
                  "<|file_sep|>", "<|repo_name|>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) over `texts`; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_as_transformers(tok, folder: Path, model_max_length: int = 2048) -> None:
    """Save so that `AutoTokenizer.from_pretrained(folder)` loads it with the FIM tokens as special tokens."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=QWEN_FIM.eot, bos_token=None, unk_token=None, pad_token=QWEN_FIM.eot,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=model_max_length,
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))


def build_tiny_model(folder: Path | str, texts: Iterable[str] | None = None, *, vocab_size: int = 512,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4, n_ctx: int = 1024,
                     seed: int = 0) -> Path:
    """A random-initialised Llama plus a BPE tokenizer with FIM tokens, saved as a model folder.

    For tests and benches: it loads through AutoModelForCausalLM / AutoTokenizer like any hub model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if texts is None:
        texts = _fallback_corpus()
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    save_as_transformers(tok, folder, model_max_length=n_ctx)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=n_ctx, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.token_to_id(QWEN_FIM.eot), pad_token_id=tok.token_to_id(QWEN_FIM.eot))
    from refact_lab.models.loading import MODEL_LOADING

    with MODEL_LOADING:  # construction ties the embeddings: not while another thread's load has that patched
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _fallback_corpus() -> list[str]:
    """A few real Python files from the standard library: enough text for a tiny BPE vocabulary."""
    import os

    stdlib = Path(os.__file__).parent
    out = []
    for name in ("os.py", "json/__init__.py", "textwrap.py", "string.py", "functools.py", "shutil.py"):
        p = stdlib / name
        if p.is_file():
            out.append(p.read_text(encoding="utf-8", errors="replace"))
    return out
