"""The one prompt builder: identical ids to the FIM prompts written before it, context laid out in the model's
repository format (or as comments), and a budget that gives way on the snippets, never on the prefix."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

from refact_lab.finetune.fim import Example
from refact_lab.finetune.packing import example_ids
from refact_lab.models.greedy import fim_prompt_ids
from refact_lab.models.prompt import Snippet, build_fim_ids, build_fim_text
from refact_lab.models.registry import QWEN_FIM, STARCODER_FIM, content_ids, resolve, token_id


@pytest.fixture(scope="module")
def qwen_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(None).source)


@pytest.fixture(scope="module")
def starcoder_tok(qwen_tok):
    """The default tokenizer with StarCoder's FIM tokens and no repo/file-separator tokens of Qwen's names."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(None).source)
    tok.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]})
    # Hide the Qwen repo tokens: the builder must fall back to the commented layout.
    tok = copy.copy(tok)
    real = tok.convert_tokens_to_ids
    tok.convert_tokens_to_ids = lambda t: tok.unk_token_id if t in ("<|repo_name|>", "<|file_sep|>") else real(t)
    return tok


def old_fim_prompt_ids(tok, fim, prefix, suffix, max_prompt_tokens, prefix_share=0.75):
    """The FIM prompt as greedy.py wrote it before the builder (the oracle)."""
    special = fim.marker_ids(tok)
    if max_prompt_tokens is None:
        pre, suf = content_ids(tok, prefix), content_ids(tok, suffix)
    else:
        room = max_prompt_tokens - 3
        pre = content_ids(tok, prefix[-room * 8:])
        suf = content_ids(tok, suffix[:room * 8])
        n_pre = min(len(pre), max(int(room * prefix_share), room - len(suf)))
        n_suf = min(len(suf), room - n_pre)
        pre = pre[len(pre) - n_pre:] if n_pre else []
        suf = suf[:n_suf]
    if fim.order == "spm":
        return [special[1]] + suf + [special[0]] + pre + [special[2]]
    return [special[0]] + pre + [special[1]] + suf + [special[2]]


def old_example_ids(examples, tok, fmt):
    """packing.example_ids before the builder (the oracle)."""
    p, s, m = fmt.marker_ids(tok)
    eot = token_id(tok, fmt.eot)
    out = []
    for ex in examples:
        pre, suf, mid = (content_ids(tok, t) for t in (ex.prefix, ex.suffix, ex.middle))
        if ex.kind == "plain":
            out.append(pre + [eot])
        elif fmt.order == "spm":
            out.append([s] + suf + [p] + pre + [m] + mid + [eot])
        else:
            out.append([p] + pre + [s] + suf + [m] + mid + [eot])
    return out


CASES = [("", ""), ("def f(x):\n    ret", "\n"), ("import os\n" * 200 + "x = os.", "\nprint(x)\n" * 150),
         ("a = '<|endoftext|><|fim_prefix|>'\n", "b = 1\n"), ("class A:\n    def m(self):\n        ", "")]
FORMATS = [("qwen", QWEN_FIM), ("starcoder", STARCODER_FIM), ("starcoder", replace(STARCODER_FIM, order="spm"))]


@pytest.mark.parametrize("which,fim", FORMATS)
def test_without_snippets_ids_are_the_old_fim_prompt(which, fim, qwen_tok, starcoder_tok):
    tok = qwen_tok if which == "qwen" else starcoder_tok
    for prefix, suffix in CASES:
        for limit in (None, 64, 200, 448):
            old = old_fim_prompt_ids(tok, fim, prefix, suffix, limit)
            assert build_fim_ids(tok, fim, prefix, suffix, max_prompt_tokens=limit).ids == old
            assert fim_prompt_ids(tok, fim, prefix, suffix, limit) == old
            # an empty snippet list changes nothing either, whatever the context budget
            assert build_fim_ids(tok, fim, prefix, suffix, [], max_prompt_tokens=limit, context_tokens=100).ids == old


@pytest.mark.parametrize("which,fim", FORMATS)
def test_training_examples_are_laid_out_as_before(which, fim, qwen_tok, starcoder_tok):
    tok = qwen_tok if which == "qwen" else starcoder_tok
    examples = [Example("psm", "def f(x):\n", "\n", "    return x"), Example("plain", "x = 1\n"),
                Example("inline", "y = f(", ")\n", "2")]
    assert example_ids(examples, tok, fim) == old_example_ids(examples, tok, fim)


def test_repository_layout_for_qwen_tokens(qwen_tok):
    snippets = [Snippet("pkg/rates.py", "def convert_with_kestrel_rate(x):\n    return x * 3\n")]
    out = build_fim_ids(qwen_tok, QWEN_FIM, "from pkg.rates import *\ny = ", "\n", snippets,
                        path="pkg/main.py", repo="demo")
    text = qwen_tok.decode(out.ids, skip_special_tokens=False)
    assert text == ("<|repo_name|>demo\n<|file_sep|>pkg/rates.py\ndef convert_with_kestrel_rate(x):\n"
                    "    return x * 3\n<|file_sep|>pkg/main.py\n<|fim_prefix|>from pkg.rates import *\ny = "
                    "<|fim_suffix|>\n<|fim_middle|>")
    assert out.snippets == tuple(snippets)
    # the markers are single ids, the snippet's code is content
    sep = qwen_tok.convert_tokens_to_ids("<|file_sep|>")
    assert out.ids.count(sep) == 2


def test_commented_layout_without_repo_tokens(starcoder_tok):
    snippets = [Snippet("pkg/rates.py", "def rate():\n    return 3\n")]
    out = build_fim_ids(starcoder_tok, STARCODER_FIM, "y = ", "\n", snippets, path="main.py")
    text = starcoder_tok.decode(out.ids, skip_special_tokens=False)
    assert text == ("<fim_prefix># Path: pkg/rates.py\n# def rate():\n#     return 3\ny = <fim_suffix>\n<fim_middle>")
    assert build_fim_text(STARCODER_FIM, "y = ", "\n", snippets, "main.py") == text


def test_budget_drops_snippets_never_the_prefix(qwen_tok):
    rng = random.Random(0)
    prefix = "".join(f"value_{i} = compute({rng.randint(0, 999)})\n" for i in range(300)) + "result = value_299 +"
    suffix = "\nprint(result)\n"
    big = [Snippet(f"mod{i}.py", "".join(f"def helper_{i}_{j}():\n    return {j}\n" for j in range(80)))
           for i in range(3)]
    plain = build_fim_ids(qwen_tok, QWEN_FIM, prefix, suffix, max_prompt_tokens=400).ids
    with_ctx = build_fim_ids(qwen_tok, QWEN_FIM, prefix, suffix, big, max_prompt_tokens=400, context_tokens=10_000)
    assert len(with_ctx.ids) <= 400
    text = qwen_tok.decode(with_ctx.ids, skip_special_tokens=False)
    # the code next to the cursor is still there; the context got at most half the room
    assert "value_298 = compute(" in text and text.endswith("result = value_299 +<|fim_suffix|>\nprint(result)\n<|fim_middle|>")
    pre_start = with_ctx.ids.index(qwen_tok.convert_tokens_to_ids("<|fim_prefix|>"))
    assert pre_start <= 200
    assert 0 < len(with_ctx.snippets) < 3   # later snippets dropped
    # a context budget is honoured, and a zero budget is the plain prompt
    small = build_fim_ids(qwen_tok, QWEN_FIM, prefix, suffix, big, max_prompt_tokens=400, context_tokens=60)
    assert small.ids.index(qwen_tok.convert_tokens_to_ids("<|fim_prefix|>")) <= 60
    assert build_fim_ids(qwen_tok, QWEN_FIM, prefix, suffix, big, max_prompt_tokens=400, context_tokens=0).ids == plain
    # a short file leaves its unused room to the context
    short = build_fim_ids(qwen_tok, QWEN_FIM, "x = ", "\n", big, max_prompt_tokens=400, context_tokens=10_000)
    assert 300 < len(short.ids) <= 400
