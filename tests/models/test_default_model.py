"""The embedded default model: it ships complete, loads like a hub model and completes at a cursor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import refact_lab
from refact_lab.models.registry import EMBEDDED_DIR, QWEN_FIM, resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(None).source
    return AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)


def test_shipped_inside_the_package_and_small():
    package = Path(refact_lab.__file__).parent
    assert EMBEDDED_DIR.parent.parent == package
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "LICENSES.md", "heldout.json"):
        assert (EMBEDDED_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert total < 60 * 2**20
    assert "small demo model" in (EMBEDDED_DIR / "README.md").read_text().lower()


def test_training_data_is_permissive_and_heldout_is_listed():
    licenses = (EMBEDDED_DIR / "LICENSES.md").read_text()
    used = licenses.split("## Skipped")[0]
    assert "| python-stdlib |" in used
    assert " GPL" not in used and "MPL" not in used
    held = json.loads((EMBEDDED_DIR / "heldout.json").read_text())
    assert len(held["files"]) >= 20 and all(len(f["sha256"]) == 64 for f in held["files"])


def test_loads_with_auto_classes(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 50e6
    assert model.config.vocab_size == len(tok)
    eot = tok.convert_tokens_to_ids(QWEN_FIM.eot)
    assert eot in model.generation_config.eos_token_id


def test_fim_tokens_are_single_special_tokens(model_and_tokenizer):
    _, tok = model_and_tokenizer
    for t in QWEN_FIM.special_tokens:
        if t == "<|im_end|>":  # a Qwen chat token this model does not have
            continue
        tid = tok.convert_tokens_to_ids(t)
        ids = tok.encode(f"x = 1{t}y = 2", add_special_tokens=False)
        assert ids.count(tid) == 1, t
        assert tok.decode([tid]) == t
        assert t in tok.all_special_tokens
    # ordinary code never produces a special token
    specials = {tok.convert_tokens_to_ids(t) for t in QWEN_FIM.special_tokens if t != "<|im_end|>"}
    assert not specials & set(tok.encode("def f(x):\n    return x  # <fim_prefix>", add_special_tokens=False))


def test_greedy_fim_completion_returns_one_line_and_stops(model_and_tokenizer):
    from refact_lab.models.greedy import complete_at_cursor

    model, tok = model_and_tokenizer
    prefix = "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print("
    suffix = "\n\n\nif __name__ == '__main__':\n    main(sys.argv)\n"
    c = complete_at_cursor(model, tok, QWEN_FIM, prefix, suffix, max_new_tokens=24)
    assert isinstance(c.text, str) and c.text.strip()
    assert "\n" not in c.text and "<|" not in c.text
    assert 1 <= c.n_tokens <= 24
    assert c.stopped in ("newline", "stop_token", "length")


def test_greedy_stops_at_end_of_text_token(model_and_tokenizer):
    """Forced: a model whose every logit favours <|endoftext|> stops after one token with empty text."""
    import torch

    from refact_lab.models.greedy import greedy_complete

    model, tok = model_and_tokenizer
    eot = tok.convert_tokens_to_ids(QWEN_FIM.eot)
    bias = torch.zeros(model.config.vocab_size)
    bias[eot] = 1e4
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        c = greedy_complete(model, tok, tok.encode("x = ", add_special_tokens=False), max_new_tokens=10,
                            stop_ids=QWEN_FIM.stop_ids(tok))
    finally:
        handle.remove()
    assert (c.text, c.stopped, c.n_tokens) == ("", "stop_token", 1)


def test_load_model_and_tokenizer_helpers_use_the_default():
    from refact_lab.models.loading import load_model, load_tokenizer

    model = load_model("default")
    tok = load_tokenizer("default")
    assert not model.training and tok.eos_token == QWEN_FIM.eot


def test_model_files_are_not_excluded_from_the_wheel():
    """hatchling leaves out what .gitignore matches; the weights must never be among it."""
    import pathspec

    root = Path(refact_lab.__file__).parent.parent
    gitignore = root / ".gitignore"
    if not gitignore.is_file():
        pytest.skip("not a source checkout")
    spec = pathspec.GitIgnoreSpec.from_lines(gitignore.read_text().splitlines())
    for f in EMBEDDED_DIR.iterdir():
        assert not spec.match_file(str(f.relative_to(root))), f


def test_token_healing_drops_a_partial_word_but_not_a_line_start(model_and_tokenizer):
    from refact_lab.models.greedy import fim_prompt_ids
    from refact_lab.models.healing import heal_fim_prompt

    _, tok = model_and_tokenizer
    suffix_id = tok.convert_tokens_to_ids(QWEN_FIM.suffix)
    prompt = fim_prompt_ids(tok, QWEN_FIM, "def f(x):\n    ret", "\n", 64)
    healed_prompt, healed, allowed = heal_fim_prompt(tok, QWEN_FIM, prompt)
    assert healed and "    ret".endswith(healed)
    assert len(healed_prompt) == len(prompt) - 1 and healed_prompt.index(suffix_id) == prompt.index(suffix_id) - 1
    texts = [tok.decode([i]) for i in allowed]
    assert prompt[prompt.index(suffix_id) - 1] in allowed and all(t.startswith(healed) for t in texts)
    assert any(t.startswith(healed + "urn") for t in texts)  # " return" is a token of this vocabulary
    at_line_start = fim_prompt_ids(tok, QWEN_FIM, "def f(x):\n", "    return x\n", 64)
    assert heal_fim_prompt(tok, QWEN_FIM, at_line_start) == (at_line_start, "", [])
    # not a FIM prompt (no middle token at the end): untouched
    plain = tok("def f(x):\n    ret")["input_ids"]
    assert heal_fim_prompt(tok, QWEN_FIM, plain) == (plain, "", [])


def test_healed_completion_continues_the_partial_word(model_and_tokenizer):
    """Whatever the model writes, the healed first token starts with the removed text, which is not repeated."""
    from refact_lab.models.greedy import complete_at_cursor

    model, tok = model_and_tokenizer
    c = complete_at_cursor(model, tok, QWEN_FIM, "import os\n\n\ndef main():\n    ret", "\n", max_new_tokens=8)
    plain = complete_at_cursor(model, tok, QWEN_FIM, "import os\n\n\ndef main():\n    ret", "\n", max_new_tokens=8,
                               heal=False)
    assert "\n" not in c.text and "\n" not in plain.text
    assert not c.text.startswith((" ret", "ret"))  # the removed text is not returned again


def test_recipe_marks_the_repeated_copies_of_a_looping_completion(model_and_tokenizer, monkeypatch):
    """The recipe's unlikelihood term pushes down the tokens from a loop's second copy on (the serving loop
    guard's definition of a loop); a completion without a loop, or one the context repeats, is left alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", ROOT / "scripts" / "train_default_model.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "recipe", recipe)  # its dataclasses look their module up
    spec.loader.exec_module(recipe)
    _, tok = model_and_tokenizer

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False)

    looping = tok.encode("t, pdict, pdict, pdict, pdict, pd", add_special_tokens=False)
    k = recipe.loop_tokens(decode, looping, context="")
    assert k is not None and decode(looping[:k]) == "t, pdict"
    fine = tok.encode("t, pdict = parse_header(line)", add_special_tokens=False)
    assert recipe.loop_tokens(decode, fine, context="") is None
    assert recipe.loop_tokens(decode, looping, context="xs = [" + ", ".join(["pdict"] * 6) + "]") is None
    run = tok.encode("0x" + "F" * 40, add_special_tokens=False)
    k = recipe.loop_tokens(decode, run, context="")
    assert k is not None and len(decode(run[:k])) <= 2 + 24


def test_recipe_splits_fim_examples_at_the_cursor_boundary_healing_uses(model_and_tokenizer, monkeypatch):
    """One definition of a cursor's token boundary for training, healing and the recipe: the recipe's FIM
    middles start where `refact_lab.models.boundary` says (`cursor_boundary=False` reproduces the old character
    splits of the shipped stages)."""
    import importlib.util
    import random

    from refact_lab.models.boundary import cursor_boundary

    spec = importlib.util.spec_from_file_location("recipe", ROOT / "scripts" / "train_default_model.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "recipe", recipe)
    spec.loader.exec_module(recipe)
    seen = []
    monkeypatch.setattr(recipe, "cursor_boundary", lambda text, i: seen.append((text, i)) or cursor_boundary(text, i))
    _, tok = model_and_tokenizer
    text = "class A:\n    def __init__(self):\n        self.s = value\n        return None\n" * 8
    maker = object.__new__(recipe.ExampleMaker)
    maker.r = recipe.Recipe(out="unused", seq_len=128)
    maker.rng = random.Random(0)
    maker._pick_text = lambda: text
    maker._enc = lambda t: tok.encode(t, add_special_tokens=False)
    maker.ids = {name: i for i, name in enumerate(
        (recipe.QWEN_FIM.prefix, recipe.QWEN_FIM.suffix, recipe.QWEN_FIM.middle))}
    maker.eot, maker.L = 3, 128
    for _ in range(20):
        maker.fim()
    assert len(seen) == 20   # every FIM example's cursor went through the shared definition
    maker.r = recipe.Recipe(out="unused", seq_len=128, cursor_boundary=False)
    for _ in range(5):
        maker.fim()
    assert len(seen) == 20   # switched off: the old character splits


def test_recipe_copy_rows_put_the_cursor_at_a_call_whose_definition_is_in_the_snippets(monkeypatch):
    """The context stage's copy rows (`copy_share`): the cursor starts a call of a name that only another file of
    the source defines, and that definition is among the snippets before the cursor's file, so the middle can be
    copied from them."""
    import importlib.util
    import random

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("recipe", ROOT / "scripts" / "train_default_model.py")
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "recipe", recipe)
    spec.loader.exec_module(recipe)
    source = resolve(None).source
    tok = Tokenizer.from_file(str(Path(source) / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(source)
    rates = "def convert_with_kestrel_rate(amount, table):\n    return amount * table['kestrel']\n"
    filler = "".join(f"def helper_{i}(x):\n    return x + {i}\n\n" for i in range(30))
    caller = filler + "def total(items):\n    amount = sum(items)\n    return convert_with_kestrel_rate(amount, TABLE)\n"
    files = [("rates.py", rates + filler), ("billing.py", caller)]
    src = recipe.Source("pkg", "1", "MIT", files)
    texts = [t for _, t in files]
    maker = recipe.ExampleMaker(tok, texts, [0.0, 1.0], recipe.Recipe(out="unused", context_rate=1.0, copy_share=1.0),
                                random.Random(0), [(0, p) for p, _ in files], [src], hf_tok)
    for _ in range(5):
        ids, _, weights = maker.fim()
        text = hf_tok.decode(ids, skip_special_tokens=False)
        before, _, rest = text.partition("<|fim_prefix|>")
        middle = rest.split("<|fim_middle|>")[1]
        assert middle.lstrip().startswith("convert_with_kestrel_rate(amount, TABLE)")
        assert "def convert_with_kestrel_rate(amount, table):" in before and "rates.py" in before
    assert maker.copy_rows == 5
    # where retrieval misses the definition, it is put in anyway
    from refact_lab.context import index

    class Blind:
        def retrieve(self, *args, **kwargs):
            return []

    monkeypatch.setattr(index.ProjectIndex, "in_memory", staticmethod(lambda files: Blind()))
    maker.indexes.clear()
    ids, _, _ = maker.fim()
    assert "def convert_with_kestrel_rate(" in hf_tok.decode(ids, skip_special_tokens=False).split("<|fim_prefix|>")[0]
    maker.r = recipe.Recipe(out="unused", context_rate=1.0, copy_share=0.0)
    maker.fim()
    assert maker.copy_rows == 6  # off: random cursors as before
