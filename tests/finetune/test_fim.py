"""FIM examples: each kind of split, in the model's own format and order, and nothing of the file lost."""

import random

import pytest

from refact_lab.finetune.fim import Example, fim_example, file_examples, windows
from refact_lab.models.registry import CODELLAMA_FIM, QWEN_FIM, STARCODER_FIM, FimFormat, resolve
from tests.finetune.conftest import STDLIB

CODE = """import os


def walk(top):
    for name in os.listdir(top):
        path = os.path.join(top, name)
        if os.path.isdir(path):
            yield from walk(path)
        else:
            yield path
"""


def test_windows_are_whole_lines_within_the_limit_and_lose_nothing():
    text = (STDLIB / "textwrap.py").read_text()
    parts = windows(text, 500)
    assert "".join(parts) == text
    assert all(len(p) <= 500 for p in parts)
    assert all(p.endswith("\n") for p in parts[:-1])        # cut at line ends
    long_line = "x" * 1200 + "\nshort\n"
    assert "".join(windows(long_line, 500)) == long_line
    assert max(len(p) for p in windows(long_line, 500)) <= 500


@pytest.mark.parametrize("seed", range(20))
def test_inline_split_is_strictly_inside_one_line(seed):
    ex = fim_example(CODE, random.Random(seed), "inline")
    assert ex.kind == "inline" and ex.source == CODE
    assert ex.middle and "\n" not in ex.middle
    # text follows the cursor on the same line
    assert ex.suffix and not ex.suffix.startswith("\n")


@pytest.mark.parametrize("seed", range(20))
def test_eol_split_runs_to_the_end_of_the_line(seed):
    ex = fim_example(CODE, random.Random(seed), "eol")
    assert ex.kind == "eol" and ex.source == CODE
    assert ex.middle and "\n" not in ex.middle
    assert ex.suffix.startswith("\n") or ex.suffix == ""


@pytest.mark.parametrize("seed", range(20))
def test_multiline_split_takes_whole_lines(seed):
    ex = fim_example(CODE, random.Random(seed), "multiline")
    assert ex.kind == "multiline" and ex.source == CODE
    # it ends with its last line's newline, so the suffix starts at the beginning of a line
    assert ex.middle.endswith("\n")
    lines_covered = ex.middle.count("\n")
    assert 1 <= lines_covered <= 8
    # the cursor sits on a line with code
    cursor_line = (ex.prefix.rsplit("\n", 1)[-1] + ex.middle.split("\n", 1)[0])
    assert cursor_line.strip()


def test_text_uses_the_models_format_and_order():
    ex = Example("eol", prefix="def f(", suffix="\n    return x\n", middle="x):")
    assert ex.text(QWEN_FIM) == "<|fim_prefix|>def f(<|fim_suffix|>\n    return x\n<|fim_middle|>x):<|endoftext|>"
    assert ex.text(STARCODER_FIM) == "<fim_prefix>def f(<fim_suffix>\n    return x\n<fim_middle>x):<|endoftext|>"
    assert ex.text(CODELLAMA_FIM) == "<PRE> def f( <SUF>\n    return x\n <MID>x):</s>"
    spm = FimFormat("<P>", "<S>", "<M>", "<E>", order="spm")
    assert ex.text(spm) == "<S>\n    return x\n<P>def f(<M>x):<E>"
    # the registry's format for Qwen2.5-Coder is what training writes, the same the server prompts with
    fmt = resolve("qwen2.5-coder-1.5b").fim
    assert ex.text(fmt).startswith(fmt.prompt("def f(", "\n    return x\n"))
    assert Example("plain", "abc").text(QWEN_FIM) == "abc<|endoftext|>"


def test_file_examples_mix_every_kind_and_plain_text_and_are_reproducible():
    text = (STDLIB / "json" / "decoder.py").read_text()
    examples = file_examples(text, random.Random(1), max_chars=300, fim_rate=0.8)
    kinds = {ex.kind for ex in examples}
    assert kinds == {"inline", "eol", "multiline", "plain"}
    assert "".join(ex.source for ex in examples) == text
    plain_share = sum(ex.kind == "plain" for ex in examples) / len(examples)
    assert 0.05 < plain_share < 0.4
    again = file_examples(text, random.Random(1), max_chars=300, fim_rate=0.8)
    assert again == examples
    assert all(ex.kind == "plain" for ex in file_examples(text, random.Random(1), max_chars=300, fim_rate=0.0))
    assert not any(ex.kind == "plain" for ex in file_examples(text, random.Random(1), max_chars=300, fim_rate=1.0))


def test_blank_window_becomes_plain_text():
    assert fim_example("\n\n   \n", random.Random(0), "eol").kind == "plain"
    assert fim_example("\n\n", random.Random(0), "multiline").kind == "plain"
