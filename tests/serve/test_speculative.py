"""Prompt-lookup speculative decoding (serve/speculative.py, Engine._pass, Batch.feed / settle).

Two engines on the same tiny model, speculation on (8 drafted tokens) and off, must give the same text, the same
finish reason and the same streamed events for every request: repetitive code (where drafts are accepted) and
text that does not repeat, stop strings, single-line, max_tokens, token healing, a LoRA deployed, the loop guard
and a client that goes away mid-stream. The counters prove that drafts were actually accepted.
"""

from __future__ import annotations

import collections
import queue

import pytest

from refact_lab.serve.engine import Engine, Generation, SamplingParams
from refact_lab.serve.speculative import agreed, draft
from tests.serve.conftest import cut_at_special
from tests.serve.helpers import make_run

REPETITIVE = [
    "x.append(1)\nx.append(2)\nx.append(3)\nx.append(4)\nx.append(",
    "for i in range(10):\n    total += values[i]\nfor i in range(10):\n    total += values[i]\nfor i in range(10):\n",
    "self.a = a\nself.b = b\nself.c = c\nself.d = d\nself.",
    "def get_name(self):\n    return self.name\n\ndef get_size(self):\n    return self.size\n\ndef get_",
    "while True:\n    ",
]
# where the tiny random model repeats itself most (found by trying): runs of several accepted drafts
LOOPING = ["&&&&&&&&", "a)+,", "1, 1, 1, 1, 1,"]
VARIED = ["a = 1\nb =", "def f(x):\n    return x *", "import json\n\ndata = json.loads(", "print('hello',",
          "class Point:\n    def __init__(self, x, y):\n"]
PROMPTS = REPETITIVE + LOOPING + VARIED


def start_pair(tmp_path_factory, model_dir, name: str, **settings) -> tuple[Engine, Engine]:
    from refact_lab.home import Home

    home = Home.resolve(tmp_path_factory.mktemp(name)).ensure()
    make_run(home, "run-a", model_dir, [10], [2.0], seed=5)
    home.update_settings(model=str(model_dir), dtype="fp32", lora={"mode": "best"}, **settings)
    # prefix reuse off on both: the two engines then run exactly the same prefills
    return tuple(Engine(home, poll_interval=0.05, prefix_cache_mib=0, speculative_tokens=k).start().wait_ready(60)
                 for k in (8, 0))


@pytest.fixture(scope="module")
def engines(tmp_path_factory, varied_model_dir):
    """Speculation on and off, no loop guard (so long repeats run on), a LoRA deployed."""
    pair = start_pair(tmp_path_factory, varied_model_dir, "spec", loop_guard=False)
    yield pair
    for e in pair:
        e.stop()


def both(engines, prompt, params: SamplingParams, model: str | None = None) -> tuple[dict, dict]:
    on, off = engines
    a, b = on.generate(prompt, params, model=model), off.generate(prompt, params, model=model)
    return a, b


def same(a: dict, b: dict) -> bool:
    keys = ("text", "finish_reason", "completion_tokens")
    return {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_draft_copies_what_followed_the_latest_occurrence_of_the_tail():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert draft(ids, 4) == [7, 8, 5, 1]         # the newest earlier [1, 2, 3], not the first one
    assert draft(ids, 2) == [7, 8]
    assert draft([4, 1, 2, 0, 1, 2], 3) == [0, 1, 2]   # no earlier trigram: the longest n-gram that did occur
    assert draft([5, 6, 7], 3) == [] and draft([5], 3) == [] and draft(ids, 0) == []
    assert agreed([7, 8, 5], [7, 8, 6, 0]) == 2 and agreed([7], [1, 2]) == 0 and agreed([7, 8], [7, 8, 3]) == 2


def test_a_pass_with_drafts_then_settle_leaves_the_cache_of_plain_steps(varied_model_dir):
    """Two rows fed [last, d1, d2, d3] and [last, d1, d2] in one pass, keeping two and three columns: from then
    on the batch computes what plain steps feeding those tokens compute (the first row's third column, inside
    the batch, is padding from then on; the last one, which no row keeps, is given back), and the in-place
    buffer is kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from refact_lab.models.loading import MODEL_LOADING
    from refact_lab.serve.batch import Batch

    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(varied_model_dir).eval()

    class Row:
        def __init__(self, ids):
            self.prompt_ids, self.pos, self.last_token = ids, 0, 0

    def step(batch, a: int, b: int):
        batch.rows[0].last_token, batch.rows[1].last_token = a, b
        return batch.step(model)

    def close(got, want):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    prompts = [[5, 9, 14, 3, 22, 7, 9, 14], [8, 1, 30, 2]]
    with torch.inference_mode():
        spec, plain = Batch(), Batch()
        for b in (spec, plain):
            b.prefill(model, [Row(p) for p in prompts])
        logits = spec.feed(model, [[11, 12, 13, 40], [4, 6, 9]])
        assert logits.shape[:2] == (2, 4)
        buffer = spec.cache.layers[0]._kbuf
        spec.settle([2, 3])
        assert [r.pos for r in spec.rows] == [10, 7] and spec.mask.shape[1] == 8 + 3
        assert spec.mask[0, -1] == 0 and spec.mask[1, -1] == 1 and spec.padded  # the first row's 13: padding
        steps = [step(plain, 11, 4), step(plain, 12, 6), step(plain, 77, 9)]
        for i, want in enumerate(steps[:2]):
            close(logits[0, i], want[0])
        for i, want in enumerate(steps):
            close(logits[1, i], want[1])
        a, fourth = step(spec, 77, 5), step(plain, 3, 5)
        close(a[0], steps[2][0])  # the first row after 11, 12, 77: the rejected 13 is not seen
        close(a[1], fourth[1])
        assert spec.cache.layers[0]._kbuf is buffer  # the padding columns stay in the buffer; nothing was copied


def test_outputs_are_the_same_with_and_without_speculation(engines, reference):
    on, off = engines
    base, lora = [r.name for r in on.served_models()]
    assert lora.endswith(":lora")
    for model in (base, lora):
        for prompt in PROMPTS:
            for max_tokens in (1, 2, 5, 9, 40):  # stops right after, inside and past one step's drafts
                a, b = both(engines, prompt, SamplingParams(max_tokens=max_tokens), model)
                assert same(a, b), (model, prompt, max_tokens, a["text"], b["text"])
    # and both are plain greedy generate (base model)
    for prompt in PROMPTS:
        assert on.generate(prompt, SamplingParams(max_tokens=24), model=base)["text"] == \
            cut_at_special(reference(prompt, 24)), prompt


def test_drafts_are_accepted_on_repetitive_code(engines):
    on, off = engines
    before = on.snapshot()["speculative"]
    for prompt in REPETITIVE + LOOPING:
        both(engines, prompt, SamplingParams(max_tokens=40))
    after = on.snapshot()["speculative"]
    assert after["tokens"] == 8
    assert after["steps"] > before["steps"] and after["accepted"] > before["accepted"]
    assert after["drafted"] >= after["accepted"]
    assert off.snapshot()["speculative"]["steps"] == 0


def test_stop_strings_and_single_line_cut_at_the_same_token(engines):
    cut = 0
    for prompt in PROMPTS:
        full = engines[1].generate(prompt, SamplingParams(max_tokens=40))["text"]
        # Cut points all along the text, so some fall inside a run of accepted drafts (the rest is discarded).
        # On looping text a short stop string first occurs early, so there the stop is all the text up to a point.
        stops = {full[:k] for k in range(1, min(len(full), 80), 3)} if prompt in LOOPING else \
            {full[k:k + 2] for k in range(2, len(full), 9)}
        for stop in stops - {""}:
            a, b = both(engines, prompt, SamplingParams(max_tokens=40, stop=(stop,)))
            assert same(a, b), (prompt, stop)
            cut += a["finish_reason"] == "stop"
        a, b = both(engines, prompt, SamplingParams(max_tokens=40, single_line=True))
        assert same(a, b) and "\n" not in a["text"].strip("\n"), prompt
    assert cut > 0


def test_token_healing_constrains_the_first_token_the_same_way(engines, reference):
    from refact_lab.models.healing import heal_fim_prompt
    from refact_lab.models.registry import QWEN_FIM

    on, _ = engines
    base = on.served_models()[0].name
    for prefix in ("def total(xs):\n    ret", "value = compute(value)\nvalue = compute(val"):
        fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>\n<|fim_middle|>"
        _, healed, allowed = heal_fim_prompt(reference.tokenizer, QWEN_FIM, reference.tokenizer(fim).input_ids)
        assert healed and allowed  # the prefix does end inside a word
        for max_tokens in (1, 3, 16):
            a, b = both(engines, fim, SamplingParams(max_tokens=max_tokens), base)
            assert same(a, b), (prefix, max_tokens)
            assert a["text"] == cut_at_special(reference(fim, max_tokens))


def stream(engine: Engine, prompt: str, params: SamplingParams, fail_after: int | None = None) -> list[dict]:
    """Every event of one streamed request; with `fail_after`, the sink raises on that text event (a client
    that went away), which cancels the request."""
    events: queue.Queue = queue.Queue()
    seen: list[dict] = []

    def sink(ev):
        events.put(ev)
        if ev["type"] == "text" and fail_after is not None and sum(e["type"] == "text" for e in seen) >= fail_after:
            raise ConnectionError("client gone")
        seen.append(ev)

    engine.submit(Generation(engine.encode(prompt), params, sink, route=engine.route(None)))
    out = []
    while (ev := events.get(timeout=60))["type"] not in ("done", "error"):
        out.append(ev)
    return out + [ev]


def test_streamed_events_and_cancellation_match(engines):
    on, off = engines
    keys = ("type", "text", "finish_reason")
    for prompt in REPETITIVE[:3]:
        a, b = stream(on, prompt, SamplingParams(max_tokens=30)), stream(off, prompt, SamplingParams(max_tokens=30))
        assert [{k: e.get(k) for k in keys} for e in a] == [{k: e.get(k) for k in keys} for e in b]
        assert "".join(e["text"] for e in a if e["type"] == "text") == a[-1]["text"]
        a = stream(on, prompt, SamplingParams(max_tokens=60), fail_after=2)
        b = stream(off, prompt, SamplingParams(max_tokens=60), fail_after=2)
        assert a[-1]["finish_reason"] == b[-1]["finish_reason"] == "cancelled"
        assert a[-1]["text"] == b[-1]["text"] and a[-1]["completion_tokens"] == b[-1]["completion_tokens"]


def test_sampling_rows_do_not_speculate_and_rows_of_a_small_batch_do(engines):
    import threading

    on, off = engines
    before = on.snapshot()["speculative"]["steps"]
    on.generate(REPETITIVE[0], SamplingParams(max_tokens=20, temperature=0.8, seed=1))
    assert on.snapshot()["speculative"]["steps"] == before
    # several requests at once share one batch: each row drafts in the same pass, and keeps what it agreed with
    shared = on.snapshot()["speculative"]["shared"]
    for engine in engines:
        events = [queue.Queue() for _ in range(3)]
        for i in range(3):  # submitted together: they are prefilled together and decode as one batch
            engine.submit(Generation(engine.encode(REPETITIVE[i]), SamplingParams(max_tokens=30), events[i].put,
                                     route=engine.route(None), stream=False))
        engine.results = [q.get(timeout=60) for q in events]
    assert on.snapshot()["speculative"]["shared"] > shared
    for i in range(3):
        assert same(on.results[i], off.results[i])
        assert same(on.results[i], off.generate(REPETITIVE[i], SamplingParams(max_tokens=30)))  # alone too


def test_the_loop_guard_cuts_at_the_same_place(tmp_path_factory, varied_model_dir):
    on, off = start_pair(tmp_path_factory, varied_model_dir, "spec_guard", loop_guard=True)
    try:
        for prompt in PROMPTS:
            a, b = both((on, off), prompt, SamplingParams(max_tokens=60))
            assert same(a, b), prompt
        assert on.snapshot()["speculative"]["accepted"] > 0
    finally:
        on.stop()
        off.stop()


def test_a_draft_from_the_previous_completion_wins_a_tie_and_loses_to_a_longer_match():
    assert draft([5, 6, 7, 8], 3, history=[9, 8, 1, 2, 3]) == [1, 2, 3]  # nothing earlier in the text itself
    assert draft([1, 2, 8, 3, 4, 8], 3, history=[8, 10, 11]) == [10, 11]  # both n = 1: the completion wins
    assert draft([7, 8, 3, 4, 7, 8], 2, history=[8, 10]) == [3, 4]  # the text repeats two tokens, history one
    assert draft([5, 6, 7, 8], 3, history=[1, 2, 8]) == []  # the match ends the completion: nothing follows it


def test_the_next_keystroke_drafts_the_rest_of_the_previous_completion(tmp_path, varied_model_dir):
    """The user types the first token that was suggested: the next request's completion is the rest of the
    previous one, drafted from it (prefix cache on) and checked in a few passes; the text equals the text of an
    engine without the prefix cache, which has no completion to draft from."""
    from refact_lab.home import Home

    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model=str(varied_model_dir), dtype="fp32", loop_guard=False)
    with_cache = Engine(home, poll_interval=0.05, prefix_cache_mib=64, speculative_tokens=8).start().wait_ready(60)
    without = Engine(home, poll_interval=0.05, prefix_cache_mib=0, speculative_tokens=8).start().wait_ready(60)
    try:
        params = SamplingParams(max_tokens=24)
        head = "import os\nimport sys\n\nCONFIG = {'name': 'demo', 'size': 3}\n\n"  # past the cache's min_tokens
        for text in VARIED + REPETITIVE:  # a prompt whose completion runs long (the tiny model stops early often)
            prompt = with_cache.encode(head + text)
            first = with_cache.generate(list(prompt), params)
            ids = with_cache.encode(first["text"], special=False)
            if len(ids) >= 16 and with_cache.decode_prompt(ids) == first["text"]:
                break
        else:
            pytest.fail("no prompt with a long completion")
        typed = list(prompt) + ids[:1]
        counts = [collections.Counter(e.speculative) for e in (with_cache, without)]
        second, reference = with_cache.generate(typed, params), without.generate(typed, params)
        assert same(second, reference)
        accepted = [e.speculative["accepted"] - c["accepted"] for e, c in zip((with_cache, without), counts)]
        # the rest of the previous completion was drafted from it: many more drafts accepted than from the text
        assert first["text"].startswith(with_cache.decode_prompt(ids[:1]) + second["text"][:8])
        assert accepted[0] >= accepted[1] + 8, accepted
    finally:
        with_cache.stop()
        without.stop()


def test_a_lone_row_drafts_eagerly_only_where_a_wide_pass_is_cheap(engines):
    """After a miss a row pauses and drafts as many as paid lately; `eager` (a lone row in the bf16 copy, where
    9 tokens cost little more than one) drafts the most every pass."""
    on, _ = engines
    ids = on.encode(REPETITIVE[0])
    g = Generation(ids, SamplingParams(max_tokens=40), lambda event: None, route=on.route(None))
    g.draft_tokens, g.plain_steps = 1, 2  # as after a pass whose drafts all missed
    assert on._drafts(g, 8) == [] and g.plain_steps == 1
    eager = on._drafts(g, 8, eager=True)
    assert len(eager) > 1 and g.draft_tokens == on.speculative_tokens
    assert eager == draft(ids, min(8, on.speculative_tokens))
