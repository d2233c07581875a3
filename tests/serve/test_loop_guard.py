"""The loop guard: a completion that repeats one piece of text three times in a row is cut after the first copy,
unless the code around the cursor repeats that piece itself; indentation is never a loop, and a run of one
character (a ruler) only when it outgrows 24 characters and the file's own runs."""

from __future__ import annotations

import pytest

from refact_lab.serve.engine import Engine, SamplingParams
from refact_lab.serve.stops import RUN_MIN, StopRules, find_loop, find_runaway_run
from tests.serve.conftest import cut_at_special


@pytest.mark.parametrize("text, kept", [
    ("return None, None, None, ", "return None, "),
    ("ng as a string, or a string, or a string, or a string", "ng as a string, or a string"),
    ("x = f(a)\nx = f(a)\nx = f(a)\n", "x = f(a)\n"),
    ("*(r-y) + 0.41*(b-y) + 0.41*(b-y) + 0.41*(b-y)", "*(r-y) + 0.41*(b-y)"),
])
def test_a_loop_is_cut_after_its_first_copy(text, kept):
    assert text[:find_loop(text)] == kept
    assert StopRules().find(text) == len(kept)


@pytest.mark.parametrize("text", [
    "        return x",          # deep indentation: blanks only
    "# ------------------------",  # a ruler: one character
    "x = foo(bar, baz)",
    "None, None",                 # two copies are not a loop yet
    "ab ab ab",                   # not at the end: "ab " does not end the text three times
])
def test_ordinary_code_is_not_a_loop(text):
    assert find_loop(text) is None


def test_a_runaway_run_of_one_character_is_cut_to_what_the_file_allows():
    text = "x = 0x10  # " + "^" * 40
    assert text[:find_runaway_run(text)] == "x = 0x10  # " + "^" * RUN_MIN
    assert StopRules().find(text) == len("x = 0x10  # ") + RUN_MIN
    ruler = "# " + "-" * 70
    assert find_runaway_run(ruler, context="x = 1\n" + ruler + "\n") is None  # as long as the file's own
    assert find_runaway_run("# " + "-" * 80, context=ruler) == 2 + 70
    assert find_runaway_run("x" + " " * 60) is None and find_runaway_run("# " + "=" * RUN_MIN) is None
    assert StopRules(loop_guard=False).find(text) is None


def test_a_repetition_the_surrounding_code_has_is_allowed():
    text = "    | str         | str         | str         "
    assert find_loop(text) is not None
    table = "    | int         | int         | int         |\n" + text.replace("str", "int")
    assert find_loop(text.replace("str", "int"), context=table) is None
    assert StopRules(loop_guard=False).find(text) is None


@pytest.fixture(scope="module")
def guarded_engine(tmp_path_factory, varied_model_dir):
    from refact_lab.home import Home

    home = Home.resolve(tmp_path_factory.mktemp("guard_home")).ensure()
    home.update_settings(model=str(varied_model_dir), dtype="fp32")  # loop_guard: on by default
    eng = Engine(home, poll_interval=0.05).start().wait_ready(60)
    yield eng
    eng.stop()


def test_the_engine_cuts_what_the_model_repeats(guarded_engine, reference):
    prompts = ["def fib(n):\n    if n < 2:\n        return", "import os\nimport sys\n\nclass Config:", "x = [1, 2,",
               "for key, value in items.items():\n    print(", "# utils\n\ndef add(a, b):\n    return a +",
               "SELECT name FROM", "a = 1\nb =", "while i < 10:\n    i +="]
    plain = {p: cut_at_special(reference(p, 40)) for p in prompts}
    guard = StopRules()  # no stop strings: only the loop guard
    looping = [p for p in prompts if any(guard.find(plain[p][:k]) is not None for k in range(len(plain[p]) + 1))]
    assert looping, "the random test model should loop on some of these prompts"
    for p in prompts:
        out = guarded_engine.generate(p, SamplingParams(max_tokens=40))
        text, full = out["text"], plain[p]
        if p not in looping:
            assert text == full
            continue
        assert out["finish_reason"] == "stop" and full.startswith(text) and len(text) < len(full), p
        rest = full[len(text):]
        # what was cut repeats the end of what was kept (two more copies of one piece, or more of one character)
        assert any(rest.startswith(text[-u:] * 2) for u in range(3, min(200, len(text)) + 1)) or \
            (rest and set(rest[:1]) == set(text[-1:])), (text, rest)


def test_the_engine_lets_a_completion_repeat_what_the_prompt_repeats(guarded_engine, reference):
    """The engine gives the guard the code around the cursor: a prompt that itself repeats a piece lets the
    completion repeat it too (cut only where the repetition goes beyond what the prompt has)."""
    prompt = "SELECT name FROM" + "ment" * 5
    plain = cut_at_special(reference(prompt, 40))
    context = reference.tokenizer.decode(reference.tokenizer(prompt).input_ids, skip_special_tokens=False)

    def guarded(rules: StopRules) -> str:
        return next((plain[:rules.find(plain[:k])] for k in range(len(plain) + 1)
                     if rules.find(plain[:k]) is not None), plain)

    with_context, without = guarded(StopRules(context=context)), guarded(StopRules())
    assert len(with_context) > len(without), "this prompt must be one where the context changes the cut"
    assert guarded_engine.generate(prompt, SamplingParams(max_tokens=40))["text"] == with_context
