"""The lean decode step (serve/decode_step.py) gives transformers' greedy tokens, for every Llama-shaped
architecture it takes (GQA and attention biases of qwen2, the per-head norms of qwen3), through everything a Batch
does: a padded batch of prompts of different lengths, plain steps, speculative verification of drafts with
rejected columns taken back, a prompt continued from stored prefix columns, rows leaving the batch. Other
architectures keep transformers' forward. A compiled step is warmed up at model load and gives the same tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from refact_lab.serve.batch import Batch
from refact_lab.serve.decode_step import LeanDecoder
from refact_lab.serve.prefix_cache import PrefixCache


def tiny(kind: str, init: float = 0.3):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, initializer_range=init)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4)).eval()
    if kind == "qwen2":  # grouped-query attention, biases on q/k/v
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=False)).eval()
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=16)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256)).eval()


class Row:
    def __init__(self, ids):
        self.prompt_ids, self.pos, self.last_token = list(ids), 0, 0


def decode(model, decoder, prompts, steps: int, drafts_every: int = 0):
    """Greedy tokens per row through a Batch: prefill, then steps; with drafts_every, every few steps each row is
    fed its last token and a half-right draft of 0 to 3 tokens in one pass (`Batch.feed`), and keeps the columns
    of what it agreed with (`settle`): rows keep different numbers, the rest become padding columns."""
    batch = Batch()
    rows = [Row(p) for p in prompts]
    with torch.inference_mode():
        logits = batch.prefill(model, rows, decoder=decoder)
        out = [[t] for t in logits.argmax(-1).tolist()]
        for r, t in zip(rows, out):
            r.last_token = t[0]
        for step in range(1, steps + 1):
            if drafts_every and step % drafts_every == 0:
                drafts = []
                for i, r in enumerate(batch.rows):
                    o = out[rows.index(r)]
                    drafts.append([o[-1], (o[-1] + 1) % 97, o[-1]][:(step + i) % 4])
                logits = batch.feed(model, [[r.last_token, *d] for r, d in zip(batch.rows, drafts)], decoder=decoder)
                kept = []
                for i, (r, d) in enumerate(zip(batch.rows, drafts)):
                    predicted = logits[i, :1 + len(d)].argmax(-1).tolist()
                    take = 1
                    while take <= len(d) and d[take - 1] == predicted[take - 1]:
                        take += 1
                    out[rows.index(r)].extend(predicted[:take])
                    r.last_token = predicted[take - 1]
                    kept.append(take)
                batch.settle(kept)
                continue
            nxt = batch.step(model, decoder=decoder).argmax(-1).tolist()
            for r, t in zip(batch.rows, nxt):
                out[rows.index(r)].append(t)
                r.last_token = t
            if step == 3 and len(batch) > 2:
                batch.keep([0, 2])  # a row finished: the rest go on
    return out


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(97) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lean_steps_give_transformers_tokens(kind):
    model = tiny(kind)
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    batch_prompts = prompts(1, (5, 17, 11, 30))
    assert decode(model, decoder, batch_prompts, 12) == decode(model, None, batch_prompts, 12)
    assert decoder.steps["lean"] > 0
    for group in (batch_prompts, prompts(2, (23,))):  # rows drafting together, and a lone row
        plain = decode(model, None, group, 16)
        for dec in (decoder, None):  # a pass adds up to 4 tokens per row at once
            drafted = decode(model, dec, group, 16, drafts_every=2)
            assert all(len(d) >= len(p) and d[:len(p)] == p for d, p in zip(drafted, plain)), dec


def test_drafts_and_padding_columns_through_transformers_forward_of_another_architecture():
    model = tiny("gpt2")  # learned positions: a padding column's position must stay inside the table
    group = prompts(5, (9, 30, 17))
    plain = decode(model, None, group, 14)
    drafted = decode(model, None, group, 14, drafts_every=2)
    assert all(len(d) >= len(p) and d[:len(p)] == p for d, p in zip(drafted, plain))


def test_a_prompt_continued_from_stored_columns_matches():
    model = tiny("qwen2")
    decoder = LeanDecoder.for_model(model)
    first, second = prompts(3, (40,))[0], None
    second = first[:32] + prompts(4, (12,))[0]  # the next keystroke: the same start, a new end
    outs = []
    for dec in (decoder, None):
        cache = PrefixCache(64 * 2**20, min_tokens=4)
        with torch.inference_mode():
            Batch().prefill(model, [Row(first)], prefixes=cache, key=None, decoder=dec)
            batch = Batch()
            logits = batch.prefill(model, [Row(second)], prefixes=cache, key=None, decoder=dec)
            assert cache.stats()["reused_tokens"] == 32
            tokens = [int(logits.argmax(-1))]
            batch.rows[0].last_token = tokens[0]
            for _ in range(8):
                tokens.append(int(batch.step(model, decoder=dec).argmax(-1)))
                batch.rows[0].last_token = tokens[-1]
        outs.append(tokens)
    assert outs[0] == outs[1]


def test_other_architectures_keep_transformers_forward():
    assert LeanDecoder.for_model(tiny("gpt2")) is None
    assert LeanDecoder.for_model(tiny("llama")) is not None


def test_small_models_decode_in_fp32_on_a_cpu():
    from refact_lab.models.loading import CPU_BF16_MIN_PARAMS, auto_dtype, cpu_has_native_bf16

    assert auto_dtype("cpu", params=CPU_BF16_MIN_PARAMS // 100) == "float32"
    big = auto_dtype("cpu", params=CPU_BF16_MIN_PARAMS * 5)
    assert big == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_a_compiled_decode_step_is_warmed_up_at_load_and_agrees(tmp_path, varied_model_dir):
    from refact_lab.home import Home
    from refact_lab.serve.engine import Engine, SamplingParams

    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model=str(varied_model_dir), dtype="fp32")
    engines = [Engine(home, poll_interval=0.05, prefix_cache_mib=0, speculative_tokens=0, compile_decode=mode)
               .start().wait_ready(300) for mode in ("on", "off")]
    try:
        compiled, eager = engines
        step = compiled.snapshot()["decode_step"]
        assert step["path"] == "compiled", step
        assert step["compile_seconds"] > 0 and step["steps"]["compiled"] == 0  # warm-up steps are not counted
        assert eager.snapshot()["decode_step"]["path"] == "lean"
        params = SamplingParams(max_tokens=12)
        for prompt in ("def add(a, b):\n    return", "import os\n\nfor name in os.listdir(", "x = [1, 2,"):
            assert compiled.generate(prompt, params)["text"] == eager.generate(prompt, params)["text"]
        assert compiled.snapshot()["decode_step"]["steps"]["compiled"] > 0
    finally:
        for e in engines:
            e.stop()


def alone(model, prompt: list[int], n: int) -> list[int]:
    """The reference: transformers' generate on one prompt, no batch, no padding."""
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        # every token is real (token 0 too: without the mask, generate would take it for padding)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("lean", [True, False])
def test_rows_joining_and_leaving_a_batch_keep_their_own_tokens(lean):
    """Slots: a shorter newcomer is written into a spare row, a longer one shifts the batch right (into new buffers,
    or within the spare columns on the left), a row that leaves hands its slot to the last row; every row still
    gets the tokens it gets alone."""
    model = tiny("llama")  # large weights: attention is sharp, so a row given another's keys goes astray
    decoder = LeanDecoder.for_model(model) if lean else None
    p = prompts(7, (10, 25, 5, 60, 8, 85))
    got: dict[int, list[int]] = {}
    batch = Batch()

    def join(indices):
        rows = [Row(p[i]) for i in indices]
        for i, r in zip(indices, rows):
            r.index = i
        with torch.inference_mode():
            logits = batch.prefill(model, rows, decoder=decoder)
        for r, t in zip(rows, logits.argmax(-1).tolist()):
            got[r.index] = [t]
            r.last_token = t

    def steps(n):
        for _ in range(n):
            with torch.inference_mode():
                nxt = batch.step(model, decoder=decoder).argmax(-1).tolist()
            for r, t in zip(batch.rows, nxt):
                got[r.index].append(t)
                r.last_token = t

    join([0, 1])
    steps(3)
    join([2])           # shorter than the batch: a spare slot
    steps(2)
    with torch.inference_mode():   # the first row leaves: the last moves up
        batch.keep([i for i, r in enumerate(batch.rows) if r.index != 0])
    assert [r.index for r in batch.rows] == [2, 1]
    join([3, 4])        # longer than the batch: every row shifts right
    steps(4)
    with torch.inference_mode():
        batch.keep([i for i, r in enumerate(batch.rows) if r.index in (3, 4)])
    steps(3)
    join([5])           # longer again: its padding goes into the spare columns on the left, nothing is copied
    steps(3)
    for i, tokens in got.items():
        assert tokens == alone(model, p[i], len(tokens)), i


def test_projections_are_fused_for_plain_layers_only_and_give_the_same_logits():
    import peft

    from refact_lab.serve.batch import new_cache
    from refact_lab.serve.decode_step import _step

    model = tiny("qwen2")
    decoder = LeanDecoder.for_model(model)
    fused = decoder.fused_for(model)
    assert fused is not None and fused[0].qkv.bias is not None  # qwen2's q/k/v biases are joined too
    assert decoder.fused_for(model) is fused  # made once per model
    # torch's rms_norm gave the norm modules' bits; queries and keys rotate together where no per-head norm is
    assert fused[0].attn_norm.fast and fused.final_norm.fast and fused[0].qk_together
    qwen3 = tiny("qwen3")
    assert not LeanDecoder.for_model(qwen3).fused_for(qwen3)[0].qk_together
    ids = torch.tensor([prompts(6, (12,))[0]])
    with torch.inference_mode():
        outs = []
        for f in (None, fused):
            cache = new_cache()
            model(input_ids=ids[:, :-1], use_cache=True, past_key_values=cache)
            bufs = [layer.reserve(1) for layer in cache.layers]
            outs.append(_step(model, ids[:, -1:], torch.tensor([[11]]), [k for k, _ in bufs], [v for _, v in bufs],
                              11, None, f))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["up_proj"]))
    assert decoder.fused_for(wrapped.get_base_model()) is None  # a LoRA layer anywhere: each projection on its own


def test_bf16_projections_are_prepacked_and_give_the_same_products():
    import torch.nn.functional as F

    from refact_lab.models.loading import cpu_has_native_bf16
    from refact_lab.serve.decode_step import Projection

    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(3, 5, 64).bfloat16()
    for b in (None, bias):
        projection = Projection(weight, b)
        if cpu_has_native_bf16() and torch.backends.mkldnn.is_available():
            assert projection.packed is not None and projection.packed_nbytes == weight.numel() * 2
        with torch.inference_mode():
            assert torch.equal(projection(x), F.linear(x, weight, b))  # packed or not: the same bits
    assert Projection(weight.float()).packed is None  # fp32 keeps MKL's products, whose rounding differs
    model = tiny("qwen2").to(torch.bfloat16)
    fused = LeanDecoder.for_model(model).fused_for(model)
    assert fused is not None and fused.head.weight is model.lm_head.weight


def test_a_pass_runs_projections_over_its_real_tokens_and_the_head_over_the_logits_read(monkeypatch):
    """A pass whose rows were fed 1, 3 and 2 tokens has 9 slots of which 6 are real: every projection takes those
    6 tokens, and the logits' head only the positions the caller reads (from `read_from` on). Those logits are
    transformers' for the same pass; the ones nobody reads are zeros."""
    from refact_lab.serve import decode_step

    model = tiny("llama")
    decoder = LeanDecoder.for_model(model)
    feeds, read_from = [[5], [6, 7, 8], [9, 10]], [0, 2, 0]
    wanted = [(0, 0), (1, 2), (2, 0), (2, 1)]
    taken = []
    real_call = decoder_projection = decode_step.Projection.__call__

    def counting(self, x):
        taken.append(x.shape[:-1].numel())
        return real_call(self, x)

    logits = {}
    for name, dec in (("lean", decoder), ("transformers", None)):
        batch, rows = Batch(), [Row(p) for p in prompts(8, (9, 21, 14))]
        with torch.inference_mode():
            batch.prefill(model, rows, decoder=dec)
            if dec is not None:
                monkeypatch.setattr(decode_step.Projection, "__call__", counting)
            logits[name] = batch.feed(model, feeds, decoder=dec, read_from=read_from)
            monkeypatch.setattr(decode_step.Projection, "__call__", decoder_projection)
    layers = len(model.model.layers)
    assert taken == [6] * (4 * layers) + [len(wanted)]  # q/k/v, o, gate/up, down per layer; then the head
    for i, j in wanted:
        assert torch.allclose(logits["lean"][i, j], logits["transformers"][i, j], atol=1e-4), (i, j)
    unread = torch.ones(logits["lean"].shape[:2], dtype=torch.bool)
    for i, j in wanted:
        unread[i, j] = False
    assert not logits["lean"][unread].any()
