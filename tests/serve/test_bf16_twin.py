"""The bf16 twin (serve/bf16_twin.py): prompts, uncached rests and wide decode steps of a small fp32 model run
through a bf16 copy on a CPU with bf16 instructions; the KV cache stays fp32 and holds what the fp32 model would
have computed, to bf16's rounding; a LoRA adapter (or the base model, when the engine disables adapters for a
request) acts in the copy as it does in the model; the crossover comes from timings measured at load; and no twin
is made where it does not pay."""

from __future__ import annotations

import pytest
import torch

from refact_lab.models.loading import cpu_has_native_bf16
from refact_lab.serve import bf16_twin
from refact_lab.serve.batch import Batch
from refact_lab.serve.decode_step import LeanDecoder
from refact_lab.serve.bf16_twin import Bf16Twin
from refact_lab.serve.prefix_cache import PrefixCache

needs_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no bf16 instructions")


def model(hidden: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, initializer_range=0.05)).eval()


class Row:
    def __init__(self, ids):
        self.prompt_ids, self.pos, self.last_token = list(ids), 0, 0


def prompts(*lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def close(a, b, share: float = 0.03):
    """Equal to bf16's rounding: the difference's norm is a small share of the value's."""
    a, b = a.float(), b.float()
    return float((a - b).norm()) <= share * float(b.norm())


def prefill_and_step(m, rows, twin=None, prefixes=None):
    batch = Batch()
    decoder = LeanDecoder.for_model(m)
    with torch.inference_mode():
        first = batch.prefill(m, rows, prefixes, None, decoder, twin)
        for r, t in zip(rows, first.argmax(-1).tolist()):
            r.last_token = t
        second = batch.step(m, decoder)
    return batch, first, second


@needs_bf16
def test_prompts_run_in_the_copy_and_leave_an_fp32_cache_of_what_fp32_computes():
    m = model()
    twin = Bf16Twin(m, min_rows=None, min_tokens=32)
    assert twin is not None
    twin.model_for(m)
    assert next(twin.current.parameters()).dtype == torch.bfloat16
    plain_batch, plain_first, plain_second = prefill_and_step(m, [Row(p) for p in prompts(40, 57)])
    batch, first, second = prefill_and_step(m, [Row(p) for p in prompts(40, 57)], twin)
    assert twin.stats()["passes"] == 1 and twin.stats()["rows"] == 97
    assert first.dtype == torch.float32 and batch.cache.layers[0].keys.dtype == torch.float32
    assert close(first, plain_first)
    for mine, theirs in zip(batch.cache.layers, plain_batch.cache.layers):
        assert mine.keys.shape == theirs.keys.shape
        assert close(mine.keys, theirs.keys) and close(mine.values, theirs.values)
    # the decode step after it is the fp32 model's, on that cache
    assert close(second, plain_second)


@needs_bf16
def test_short_prompts_and_short_rests_stay_in_fp32():
    m = model()
    twin = Bf16Twin(m, min_rows=None, min_tokens=32)
    twin.model_for(m)
    short = prompts(32 - 1)[0]
    _, first, _ = prefill_and_step(m, [Row(short)], twin)
    _, plain_first, _ = prefill_and_step(m, [Row(short)])
    assert twin.stats()["passes"] == 0
    assert torch.equal(first, plain_first)


@needs_bf16
def test_the_uncached_rest_of_a_prompt_runs_in_the_copy():
    m = model()
    twin = Bf16Twin(m, min_rows=None, min_tokens=32)
    twin.model_for(m)
    head, tail = prompts(80, 45)
    cache = PrefixCache(64 * 2**20)
    prefill_and_step(m, [Row(head)], twin, cache)  # stores the head's columns
    before = twin.stats()["rows"]
    batch, first, second = prefill_and_step(m, [Row(head + tail)], twin, cache)
    assert cache.stats()["hits"] == 1
    assert twin.stats()["rows"] - before == len(tail)  # only the rest ran, in the copy
    _, plain_first, plain_second = prefill_and_step(m, [Row(head + tail)])
    assert batch.cache.layers[0].keys.dtype == torch.float32
    assert close(first, plain_first) and close(second, plain_second)


@needs_bf16
def test_an_adapter_acts_in_the_copy_as_in_the_model():
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model(), LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False), adapter_name="lora1").eval()
    twin = Bf16Twin(m, min_rows=None, min_tokens=32)
    copy = twin.model_for(m)
    ids = prompts(60)[0]
    with torch.inference_mode():
        tuned = m(input_ids=torch.tensor([ids])).logits
        with m.disable_adapter():
            base = m(input_ids=torch.tensor([ids])).logits
        assert not close(tuned, base, 0.2)  # the adapter changes the logits far more than bf16 rounds them
        copy.set_adapter("lora1")
        assert close(copy(input_ids=torch.tensor([ids])).logits, tuned)
        with copy.disable_adapter():
            assert close(copy(input_ids=torch.tensor([ids])).logits, base)
    assert twin.model_for(m) is copy and twin.stats()["builds"] == 1  # the same model: not copied again


@needs_bf16
def test_a_wide_decode_step_runs_in_the_copy_and_writes_fp32_keys():
    m = model()
    twin = Bf16Twin(m, min_rows=4, min_tokens=None)
    twin.model_for(m)
    decoder = LeanDecoder.for_model(m)
    results = []
    for use in (None, twin):
        batch = Batch()
        rows = [Row(p) for p in prompts(20, 25, 30, 28)]  # padded, each prompt under min_rows x 8: fp32 prefill
        with torch.inference_mode():
            first = batch.prefill(m, rows, decoder=decoder)
            for r, t in zip(rows, first.argmax(-1).tolist()):
                r.last_token = t
            results.append((batch, batch.step(m, decoder, use)))
    (plain, plain_logits), (mine, logits) = results
    assert twin.stats()["passes"] == 1 and twin.stats()["rows"] == 4
    assert logits.dtype == torch.float32 and close(logits, plain_logits)
    for a, b in zip(mine.cache.layers, plain.cache.layers):
        assert a.keys.dtype == torch.float32
        assert close(a.keys[:, :, -1], b.keys[:, :, -1]) and close(a.values[:, :, -1], b.values[:, :, -1])


def test_the_crossover_is_where_bf16_is_clearly_faster_from_there_on():
    assert bf16_twin.crossover({1: (10, 30), 4: (50, 25), 16: (90, 35), 64: (200, 70)}) == 4
    assert bf16_twin.crossover({1: (30, 25), 2: (40, 30), 64: (200, 70)}) == 1
    assert bf16_twin.crossover({1: (10, 10.5), 4: (50, 40), 16: (90, 35), 64: (200, 70)}) == 4  # slower at one
    # one larger size measured slow (a busy moment) does not push the choice up
    assert bf16_twin.crossover({1: (10, 8), 2: (10, 7), 4: (20, 21), 8: (30, 20), 16: (50, 30)}) == 1
    assert bf16_twin.crossover({1: (10, 30), 64: (200, 190)}) is None
    m = model()
    timings = bf16_twin.calibrate(m, Bf16Twin(m, min_rows=1).model_for(m), LeanDecoder.for_model(m))
    assert sorted(timings["step"]) == list(bf16_twin.STEP_ROWS)
    assert sorted(timings["prompt"]) == list(bf16_twin.PROMPT_TOKENS)
    assert all(a > 0 and b > 0 for kind in timings.values() for a, b in kind.values())
    assert bf16_twin.calibrate(m, Bf16Twin(m, min_rows=1).model_for(m))["step"] == {}  # no lean step: no steps


def test_no_copy_where_it_does_not_pay(monkeypatch):
    m = model()
    assert Bf16Twin.for_model(m, "cuda", "float32", "auto") is None
    assert Bf16Twin.for_model(m, "cpu", "bfloat16", "auto") is None
    assert Bf16Twin.for_model(m, "cpu", "float32", "fp32") is None  # fp32 asked for: fp32 numbers
    monkeypatch.setattr(bf16_twin, "crossover", lambda timings: None)  # bf16 measured no faster on this CPU
    assert Bf16Twin.for_model(m, "cpu", "float32", "auto") is None


@needs_bf16
def test_the_engine_uses_the_copy_recopies_it_for_adapters_and_shows_it(tmp_path, monkeypatch):
    import threading

    from refact_lab.home import Home
    from refact_lab.models.tokenizer_build import build_tiny_model
    from refact_lab.serve.engine import Engine, SamplingParams
    from refact_lab.ui.hosting_panel import render_state
    from tests.serve.helpers import make_run, wait_for

    monkeypatch.setattr(bf16_twin, "crossover", lambda timings: 4)  # whatever this CPU measured
    folder = build_tiny_model(tmp_path / "model", hidden_size=256)
    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model=str(folder))
    engine = Engine(home).start().wait_ready(120)
    try:
        snap = engine.snapshot()
        twin = snap["bf16_twin"]
        assert snap["dtype"] == "float32" and twin["builds"] == 1 and twin["min_rows"] == twin["min_tokens"] == 4
        assert len(twin["timings_ms"]["step"]) == len(bf16_twin.STEP_ROWS)
        prompt = "def parse(line):\n    fields = line.split(',')\n    return {name: value for name, value in zip"
        engine.generate(prompt, SamplingParams(max_tokens=4))
        assert engine.snapshot()["bf16_twin"]["passes"] == 1  # the prompt; its one-row steps stay fp32
        assert "bf16 copy" in render_state(engine.snapshot())

        threads = [threading.Thread(target=engine.generate, args=(f"{prompt} {i}", SamplingParams(max_tokens=12)))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 8 prompts in at most 8 prefill passes, and at least one step of 4+ rows
        assert engine.snapshot()["bf16_twin"]["passes"] > 1 + 8

        make_run(home, "run-a", folder, [10], [2.0], seed=1, created_at=1000)
        home.update_settings(lora={"mode": "best"})
        wait_for(lambda: engine.snapshot()["lora"]["deployed"], timeout=30, what="adapter deployed")
        assert engine.snapshot()["bf16_twin"]["builds"] == 2  # copied again with the adapter in it
        before = engine.snapshot()["bf16_twin"]["passes"]
        engine.generate(prompt + " ", SamplingParams(max_tokens=4), model=engine.served_models()[-1].name)
        assert engine.snapshot()["bf16_twin"]["passes"] == before + 1
        # a second adapter goes into the same peft wrapper (the first is then removed from it): copied again too
        make_run(home, "run-b", folder, [5], [1.0], seed=2, created_at=2000)
        home.update_settings(lora={"mode": "latest"})
        wait_for(lambda: (engine.snapshot()["lora"]["deployed"] or {}).get("run_id") == "run-b", timeout=30,
                 what="second adapter deployed")
        assert engine.snapshot()["bf16_twin"]["builds"] >= 3
        engine.generate(prompt + "  ", SamplingParams(max_tokens=4), model=engine.served_models()[-1].name)
        assert engine.snapshot()["bf16_twin"]["passes"] == before + 2
    finally:
        engine.stop()


def test_the_memory_plan_counts_the_copy_where_it_may_be_kept(tmp_path):
    from refact_lab.models.tokenizer_build import build_tiny_model
    from refact_lab.serve import memory_plan

    wide = build_tiny_model(tmp_path / "wide", hidden_size=256)
    narrow = build_tiny_model(tmp_path / "narrow", hidden_size=64)
    auto = memory_plan.plan(str(wide), "cpu", "auto", 512, 4)
    e = auto.estimate
    assert e.twin_bytes == (e.params * 2 if cpu_has_native_bf16() else 0)
    assert auto.need["cpu"] == e.weights_bytes + e.kv_bytes + e.twin_bytes
    if e.twin_bytes:
        assert "bf16 copy" in auto.summary()
    assert memory_plan.plan(str(wide), "cpu", "fp32", 512, 4).estimate.twin_bytes == 0  # fp32 asked for
    assert memory_plan.plan(str(narrow), "cpu", "auto", 512, 4).estimate.twin_bytes == 0  # too narrow


def test_the_timed_choice_is_remembered_per_machine_and_taken_at_the_next_load(tmp_path, monkeypatch):
    """The crossover moves with the machine's load; a choice that changed between two loads would change greedy
    completions (bf16 rounds differently), so the second load of the same shape takes the first one's choice."""
    if not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU: no twin is timed")
    m = model()
    remember = tmp_path / "bf16_twin.json"
    calls = []
    real = bf16_twin.calibrate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bf16_twin, "calibrate", counted)
    first = Bf16Twin.for_model(m, "cpu", "float32", "auto", LeanDecoder.for_model(m), remember=remember)
    assert len(calls) == 1 and remember.is_file()
    # the next load sees other timings (a busy machine): it must not time again, nor choose otherwise
    monkeypatch.setattr(bf16_twin, "calibrate", lambda *a, **k: pytest.fail("timed again"))
    second = Bf16Twin.for_model(m, "cpu", "float32", "auto", LeanDecoder.for_model(m), remember=remember)
    assert (first is None) == (second is None)
    if first is not None:
        assert (second.min_rows, second.min_tokens) == (first.min_rows, first.min_tokens)
        assert second.current is not None  # copied at load, not on the first request
