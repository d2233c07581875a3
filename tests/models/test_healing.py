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


def _default_tokenizer():
    from transformers import AutoTokenizer

    from refact_lab.models.registry import EMBEDDED_DIR

    return AutoTokenizer.from_pretrained(EMBEDDED_DIR)


def test_whitespace_before_the_cursor_is_healed_to_the_boundary_training_sees():
    """A fresh line's indentation ends in the token "\\n        ", which the tokenizer only makes before a blank
    line; with code after it the text is "\\n       " + " self". Healing cuts there and the first token must put
    code after that space (the old healing skipped tokens holding a newline)."""
    tok = _default_tokenizer()
    vocab = vocabulary(tok)
    for prefix in ("class A:\n    def __init__(self):\n        ", "def f(s):\n    s = "):
        ids = tok(QWEN_FIM.prompt(prefix, "\n"))["input_ids"]
        healed_ids, healed, allowed = heal_fim_prompt(tok, QWEN_FIM, ids)
        assert healed == " "
        kept = tok.decode(healed_ids, skip_special_tokens=False)
        assert kept == QWEN_FIM.prompt(prefix[:-1], "\n")
        assert allowed and all(vocab.texts[i][0] == " " and not vocab.texts[i][1].isspace() for i in allowed)


def test_healing_and_training_splits_share_one_cursor_boundary():
    """At every cursor of real code, healing keeps exactly the prefix up to `cursor_boundary` and asks the first
    token for the rest; training's FIM split puts its prefix at the same offset."""
    import random

    from refact_lab.finetune.fim import _split
    from refact_lab.models.boundary import cursor_boundary
    from tests.finetune.conftest import STDLIB

    tok = _default_tokenizer()
    text = (STDLIB / "textwrap.py").read_text()[:6000]
    rng = random.Random(0)
    checked = fallbacks = 0
    for cursor in sorted(rng.sample(range(300, len(text) - 1), 300)):
        if text[cursor].isspace():  # the definition assumes code follows the cursor, as at an IDE cursor
            continue
        b = cursor_boundary(text, cursor)
        assert _split(text, cursor, len(text), "eol").prefix == text[:b]
        prefix = text[max(0, cursor - 300):cursor]
        ids = tok(QWEN_FIM.prompt(prefix, text[cursor:cursor + 100]))["input_ids"]
        healed_ids, healed, _ = heal_fim_prompt(tok, QWEN_FIM, ids)
        if not vocabulary(tok).starting_with(text[b:cursor]):
            # the vocabulary splits that word (" Soft" = " So" + "ft"): healing cuts at the next token start
            assert healed and text[b:cursor].endswith(healed)
            fallbacks += 1
            continue
        assert healed == text[b:cursor]
        if healed:
            kept = QWEN_FIM.prefix + prefix[:len(prefix) - len(healed)] + QWEN_FIM.suffix
            assert tok.decode(healed_ids, skip_special_tokens=False).startswith(kept)
        checked += 1
    assert checked > 100 and fallbacks < checked / 2


def test_served_completions_do_not_repeat_the_lines_whitespace(home):
    """Through the serving engine with the embedded default model: at a fresh line's indentation and after
    `= ` in real code, no completion starts with whitespace (the line already has it)."""
    from refact_lab.scoreboard.cursors import sample_cursors
    from refact_lab.serve.client import LocalInference
    from tests.finetune.conftest import STDLIB

    files = [(n, (STDLIB / n).read_text()) for n in ("textwrap.py", "sched.py")]
    # the cursors whose line already ends in whitespace before the cursor (indentation, "= ", ", ")
    cursors = [c for c in sample_cursors(files, 100, seed=5)
               if c.kind in ("newline_indent", "after_operator") and c.prefix.endswith((" ", "\t"))]
    cases = [("class A:\n    def __init__(self):\n        ", "\n"), ("def f(s):\n    s = ", "\n    return s\n")]
    cases += [(c.prefix[-800:], c.suffix[:200]) for c in cursors]
    inference = LocalInference(home)
    try:
        starts = [inference.complete(p, s, max_tokens=4, single_line=True)["text"][:1] for p, s in cases]
    finally:
        inference.stop()
    assert len(starts) > 20 and not [s for s in starts if s in (" ", "\t")]


def test_cursor_boundary_on_hand_checked_cursors():
    from refact_lab.models.boundary import cursor_boundary

    cases = {"class A:\n    def f(self):\n        ": -1,   # "\n       " + " self": the last space goes
             "    s = ": -1,                               # " =" + " x"
             "    ret": -4,                                # " ret" + "urn"
             "self.clo": -3,                               # "." + "clo"
             "x = foo(": -1,                               # "(" continues as a run of symbols
             "x = 12": -3,                                 # " 12"
             "x = 1\n": 0, "\t": 0, "": 0}                 # after a newline or a tab: the cursor itself
    for text, back in cases.items():
        assert cursor_boundary(text) == len(text) + back, text
    assert cursor_boundary("    return x", 6) == 3  # "    re|turn x": " re", whatever follows the cursor
