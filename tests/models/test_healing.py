"""Token healing is applied only where a token's text tells what it adds: byte-level BPE, not SentencePiece."""

from __future__ import annotations

from refact_lab.models.healing import heal_fim_prompt, vocabulary
from refact_lab.models.registry import QWEN_FIM


def _sentencepiece_tokenizer():
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["def f(x):\n    return x + value\n" * 50], vocab_size=150,
                           special_tokens=["<unk>", *QWEN_FIM.special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>",
                                   additional_special_tokens=list(QWEN_FIM.special_tokens))


def test_sentencepiece_prompts_are_left_alone():
    tok = _sentencepiece_tokenizer()
    assert not vocabulary(tok).concatenates  # "▁return" decodes alone as "return", without its space
    ids = tok(QWEN_FIM.prompt("def f(x):\n    ret", "\n"))["input_ids"]
    assert heal_fim_prompt(tok, QWEN_FIM, ids) == (ids, "", [])


def test_byte_level_prompts_are_healed():
    from transformers import AutoTokenizer

    from refact_lab.models.registry import EMBEDDED_DIR

    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    assert vocabulary(tok).concatenates
    ids = tok(QWEN_FIM.prompt("def f(x):\n    ret", "\n"))["input_ids"]
    healed_ids, healed, allowed = heal_fim_prompt(tok, QWEN_FIM, ids)
    assert healed and len(healed_ids) == len(ids) - 1 and allowed
