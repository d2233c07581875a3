"""Prefix reuse: the stored KV of recent prompts gives the same logits and the same greedy completions as
computing every prompt from scratch, per adapter, with token healing, for keystroke-like prompt sequences."""

from __future__ import annotations

import threading

import pytest

from refact_lab.serve.engine import Engine, SamplingParams
from refact_lab.serve.prefix_cache import PrefixCache, common_prefix
from tests.serve.helpers import make_run

CODE = '''import os


def walk_sizes(root):
    """Total size of the files under root, per extension."""
    sizes = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            ext = os.path.splitext(name)[1] or "(none)"
            path = os.path.join(folder, name)
            sizes[ext] = sizes.get(ext, 0) + os.path.getsize(path)
    return sizes
'''
SUFFIX = "\n\nif __name__ == '__main__':\n    print(walk_sizes('.'))\n"


def fake_kv(tokens: int, layers: int = 2):
    import torch

    return [(torch.zeros(1, 2, tokens, 4), torch.zeros(1, 2, tokens, 4)) for _ in range(layers)]


# ---- the store ------------------------------------------------------------------------------------------------

def test_common_prefix():
    import numpy as np

    long = tuple(range(1000))
    cases = [((1, 2, 3), (1, 2, 4), 2), ((1, 2, 3), (1, 2, 3, 4), 3), ((5,), (1,), 0), ((), (1,), 0),
             (long, long[:777] + (-1,) + long[778:], 777), ((151643, 7), (151643, 7), 2)]
    for a, b, n in cases:
        assert common_prefix(a, b) == n
        # the form stored prompts are compared in
        assert common_prefix(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) == n


def test_lookup_finds_the_longest_match_of_the_same_adapter_and_leaves_one_token_to_run():
    pc = PrefixCache(2**20, min_tokens=4)
    a, b = list(range(100, 140)), list(range(100, 120)) + list(range(500, 520))
    pc.store(None, a, fake_kv(len(a)))
    pc.store(None, b, fake_kv(len(b)))
    n, layers = pc.lookup(None, a[:30] + [7, 7])
    assert n == 30 and layers[0][0].shape[-2] == len(a)
    assert pc.lookup(None, b[:25] + [1])[0] == 25
    assert pc.lookup(None, a)[0] == len(a) - 1  # the same prompt again: its last token still runs
    assert pc.lookup("lora-1", a) == (0, None)  # another adapter's KV is never used
    assert pc.lookup(None, a[:3] + [1, 1, 1, 1])[0] == 0  # below min_tokens
    assert pc.hits == 3 and pc.lookups == 5


def test_budget_evicts_least_recently_used_and_extended_prompts_replace_their_prefix():
    one = 2 * 2 * (2 * 50 * 4 * 4)  # bytes of fake_kv(50)
    pc = PrefixCache(3 * one, min_tokens=1)
    prompts = [[i] * 50 for i in range(1, 4)]
    for p in prompts:
        pc.store(None, p, fake_kv(50))
    assert len(pc) == 3 and pc.bytes == 3 * one
    pc.lookup(None, prompts[0] + [9])  # prompt 1 is now the most recently used
    pc.store(None, [7] * 50, fake_kv(50))
    assert pc.lookup(None, prompts[1] + [9])[0] == 0  # prompt 2 was the least recently used: evicted
    assert pc.lookup(None, prompts[0] + [9])[0] == 50
    assert pc.bytes <= pc.budget_bytes and pc.evictions == 1
    pc.store(None, prompts[0] + [4] * 10, fake_kv(60))  # extends prompt 1: replaces it (and evicts prompt 3)
    assert sorted((e.ids[0], len(e.ids)) for e in pc._entries.values()) == [(1, 60), (7, 50)]
    assert pc.lookup(None, prompts[0] + [4] * 10 + [5])[0] == 60
    assert pc.bytes == one + one * 60 // 50
    pc.drop_key(None)
    assert len(pc) == 0 and pc.bytes == 0
    off = PrefixCache(0)
    off.store(None, [1] * 50, fake_kv(50))
    assert len(off) == 0


# ---- the batch ------------------------------------------------------------------------------------------------

class Row:
    def __init__(self, ids):
        self.prompt_ids, self.pos, self.last_token = list(ids), 0, 0


def test_reused_columns_give_the_logits_of_a_full_prefill_before_and_while_decoding(varied_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from refact_lab.models.loading import MODEL_LOADING
    from refact_lab.serve.batch import Batch

    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(varied_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    base = torch.randint(10, vocab, (120,), generator=gen).tolist()
    other = torch.randint(10, vocab, (30,), generator=gen).tolist()
    # a prompt typed further, one edited in the middle, an unrelated one (runs in the newcomers' padded batch)
    prompts = [base + [11, 12], base[:70] + [13] + base[71:], other]
    pc = PrefixCache(64 * 2**20)
    with torch.inference_mode():
        Batch().prefill(model, [Row(base)], pc, None)
        running = Batch()
        running.prefill(model, [Row(base[::-1][:20])], pc, None)  # a row already decoding: the newcomers merge into it
        reused = running.prefill(model, [Row(p) for p in prompts], pc, None)
        assert pc.hits == 2 and pc.reused_tokens == 120 + 70
        plain = Batch()
        full = plain.prefill(model, [Row(p) for p in prompts])
        torch.testing.assert_close(reused, full, atol=1e-4, rtol=1e-4)
        for step in range(3):
            for b in (running, plain):
                for r in b.rows:
                    r.last_token = 40 + step
            a, b = running.step(model), plain.step(model)
            # the rows sit in another order in each batch (and `running` has its older row)
            by_prompt = {tuple(r.prompt_ids): a[i] for i, r in enumerate(running.rows)}
            for i, r in enumerate(plain.rows):
                torch.testing.assert_close(by_prompt[tuple(r.prompt_ids)], b[i], atol=1e-4, rtol=1e-4)


# ---- the engine ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(tmp_path_factory, varied_model_dir):
    """Two engines on the same model with a LoRA deployed: prefix reuse on and off."""
    from refact_lab.home import Home

    out = []
    for mib in (64, 0):
        home = Home.resolve(tmp_path_factory.mktemp(f"prefix_{mib}")).ensure()
        make_run(home, "run-a", varied_model_dir, [10], [2.0], seed=3)
        home.update_settings(model=str(varied_model_dir), dtype="fp32", loop_guard=False,
                             lora={"mode": "best"})
        out.append(Engine(home, poll_interval=0.05, prefix_cache_mib=mib).start().wait_ready(60))
    yield out
    for e in out:
        e.stop()


def keystroke_prompts(engine, route, start: int, stop: int, step: int = 1) -> list[list[int]]:
    # the file typed up to each cursor, the code after the function as the suffix (FIM prompts are healed)
    return [engine.encode_fim(route.fim, CODE[:k], SUFFIX) for k in range(start, stop, step)]


def test_keystroke_completions_are_the_same_with_and_without_reuse_on_base_and_lora(engines):
    on, off = engines
    assert [r.name for r in on.served_models()][-1].endswith(":lora")
    params = SamplingParams(max_tokens=8)
    texts = {}
    for engine in (on, off):
        for route in engine.served_models():  # the base model, then base + LoRA: same prompts, other KV
            for ids in keystroke_prompts(engine, route, 150, 260, 3):
                texts.setdefault((engine is on, route.name), []).append(
                    engine.generate(ids, params, model=route.name)["text"])
    names = [r.name for r in on.served_models()]
    for name in names:
        assert texts[(True, name)] == texts[(False, name)], name
    assert texts[(True, names[0])] != texts[(True, names[1])]  # the adapter does change the text
    stats = on.snapshot()["prefix_cache"]
    assert stats["hits"] >= 60 and stats["reused_tokens"] > stats["prompt_tokens"] // 2
    assert off.snapshot()["prefix_cache"]["hits"] == 0
    # a keystroke's prompt rest ran in the decode pass (Engine._pass), not in a prefill of its own
    assert on.snapshot()["counters"]["joined"] >= 60 and off.snapshot()["counters"].get("joined", 0) == 0


def test_concurrent_keystrokes_joining_a_running_batch_match_too(engines):
    on, off = engines
    params = SamplingParams(max_tokens=12)
    results: dict = {}

    def run(engine, i, ids):
        results[(engine is on, i)] = engine.generate(ids, params)["text"]

    for engine in (on, off):
        prompts = keystroke_prompts(engine, engine.served_models()[-1], 200, 330, 13)
        threads = [threading.Thread(target=run, args=(engine, i, ids)) for i, ids in enumerate(prompts)]
        for i, t in enumerate(threads):
            t.start()
            threading.Event().wait(0.005 * (i % 3))  # some arrive together, some join a decoding batch
        for t in threads:
            t.join(60)
    assert len(results) == 20
    for i in range(10):
        assert results[(True, i)] == results[(False, i)], i


def test_the_suggestion_the_user_types_along_is_what_the_first_pass_drafts(engines):
    """`Engine._typed_ahead`: the previous keystroke's prompt and completion give the text the model expected
    after the old cursor; when the user typed a start of it, the drafts are the rest of it, so the text before the
    new cursor and the drafts make up that same text. Typing something else drafts nothing."""
    from refact_lab.models.healing import heal_fim_prompt

    on, _ = engines
    route = on.served_models()[0]
    cut = CODE.index("sizes[ext]")

    def healed(prefix):  # the healed prompt, and the text healing took off its end
        return heal_fim_prompt(on.tokenizer, route.fim, on.encode_fim(route.fim, prefix, SUFFIX))[:2]

    before, took = healed(CODE[:cut])
    completion = on.encode(took + "sizes[ext] = sizes.get(ext, 0)", special=False)  # it starts with what was healed

    def text(ids):  # the tokens before the cursor, as text
        return on.decode_prompt(list(ids[:on._before_cursor(ids)]))

    for typed in ("s", "sizes[", "sizes[ext] = size"):
        now, took_now = healed(CODE[:cut] + typed)
        ahead = on._typed_ahead(tuple(before), tuple(completion), now, took_now)
        assert ahead and text(now) + on.decode_prompt(list(ahead)) == text(before) + on.decode_prompt(completion)
    for other in ("total", "sizes[name"):
        now, took_now = healed(CODE[:cut] + other)
        assert on._typed_ahead(tuple(before), tuple(completion), now, took_now) == (), other


def test_stored_prompts_are_forgotten_when_the_base_model_changes(tmp_path, varied_model_dir, tiny_model_dir):
    import time

    from refact_lab.home import Home

    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model=str(varied_model_dir), dtype="fp32", loop_guard=False)
    engine = Engine(home, poll_interval=0.05, prefix_cache_mib=64).start().wait_ready(60)
    try:
        ids = engine.encode(CODE)
        engine.generate(ids, SamplingParams(max_tokens=2))
        assert engine.snapshot()["prefix_cache"]["entries"] == 1
        first = engine.snapshot()["model"]
        home.update_settings(model=str(tiny_model_dir))
        deadline = time.monotonic() + 60
        while not (engine.snapshot()["model"] != first and engine.state == "ready"):
            assert time.monotonic() < deadline, "the model change was not applied"
            time.sleep(0.05)
        engine.generate(ids, SamplingParams(max_tokens=2))  # the same prompt: the old model's KV must not serve it
        stats = engine.snapshot()["prefix_cache"]
        assert stats["hits"] == 0 and stats["entries"] == 1
    finally:
        engine.stop()


def test_a_stored_prompt_remembers_its_completion_for_the_nearest_next_prompt():
    import torch

    from refact_lab.serve.prefix_cache import PrefixCache

    cache = PrefixCache(2**20, min_tokens=4)
    layers = [(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4))]
    prompt = list(range(10))
    cache.store("a", prompt, layers)
    assert cache.completion_near("a", prompt + [99]) == ((), ())  # nothing generated yet
    cache.remember("a", prompt, [40, 41, 42])
    cache.remember("a", [7, 7, 7], [1])  # not stored: nothing happens
    assert cache.completion_near("a", prompt + [40]) == (tuple(prompt), (40, 41, 42))
    assert cache.completion_near("b", prompt + [40]) == ((), ())  # another adapter's completion is no draft
    assert cache.completion_near("a", [0, 1, 2, 50, 51]) == ((), ())  # a shared head shorter than min_tokens
