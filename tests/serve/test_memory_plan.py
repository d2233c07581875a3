"""The memory plan: weights and KV estimates from a model's files, and placements refused with their numbers."""

from __future__ import annotations

import json

import pytest

from refact_lab.serve import memory_plan as mp

GiB = 2**30


def test_weights_are_the_safetensors_parameter_count_at_the_dtype(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from refact_lab.models.loading import MODEL_LOADING

    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stored = sum(p.numel() for p in model.parameters())  # tied weights count once, as in the file
    assert mp.safetensors_params(tiny_model_dir) == stored
    est16 = mp.estimate(str(tiny_model_dir), 2, n_ctx=4096, max_batch=1)
    est32 = mp.estimate(str(tiny_model_dir), 4, n_ctx=4096, max_batch=1)
    assert est16.weights_from == "safetensors" and est16.params == stored
    assert est32.weights_bytes == 2 * est16.weights_bytes == 4 * stored


def test_kv_cache_is_layers_by_kv_heads_by_head_dim_by_tokens_by_batch(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    n_ctx = min(512, config["max_position_embeddings"])
    est = mp.estimate(str(tiny_model_dir), 2, n_ctx=512, max_batch=8)
    assert est.n_ctx == n_ctx
    assert est.kv_bytes == layers * kv_heads * head_dim * n_ctx * 8 * 2 * 2
    # grouped-query attention: the KV heads count, not the query heads
    gqa = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584}
    assert mp.kv_bytes(gqa, 32768, 16, 2) == 28 * 4 * 128 * 32768 * 16 * 2 * 2


def test_the_context_is_capped_by_the_models_own_limit(tiny_model_dir):
    limit = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert mp.estimate(str(tiny_model_dir), 2, n_ctx=10 * limit, max_batch=1).n_ctx == limit


def test_a_model_without_files_falls_back_to_the_registry_figure():
    est = mp.estimate("Qwen/Qwen2.5-Coder-7B-not-downloaded", 2, n_ctx=4096, max_batch=4, registry_gb=15.0)
    assert est.weights_from == "registry" and est.weights_bytes == 15 * GiB and est.kv_bytes is None
    assert mp.estimate("x/y", 4, 4096, 4, registry_gb=15.0).weights_bytes == 30 * GiB  # fp32: twice bf16


def _est(weights_gib: float, kv_gib: float = 0.0) -> mp.Estimate:
    return mp.Estimate(int(weights_gib * GiB), int(kv_gib * GiB), None, "safetensors", 4096, 16)


def test_cpu_placement_fits_or_is_refused_with_the_numbers():
    ok = mp.plan_for(_est(3, 1), "cpu", {"cpu": 8 * GiB})
    assert ok.fits and ok.need == {"cpu": 4 * GiB} and "4.00 GiB of 8.00 GiB free" in ok.summary()
    bad = mp.plan_for(_est(6, 3), "cpu", {"cpu": 8 * GiB})
    assert not bad.fits
    assert bad.problems == ["cpu: needs 9.00 GiB but the available RAM is 8.00 GiB"]


def test_a_shard_splits_the_model_over_its_gpus():
    free = {"cuda:0": 10 * GiB, "cuda:1": 10 * GiB, "cuda:2": 1 * GiB}
    p = mp.plan_for(_est(14, 2), "shard:0,1", free)
    assert p.fits and p.need == {"cuda:0": 8 * GiB, "cuda:1": 8 * GiB}
    q = mp.plan_for(_est(14, 2), "shard:0,2", free)
    assert not q.fits and q.problems == ["cuda:2: needs 8.00 GiB but the free memory on cuda:2 is 1.00 GiB"]
    assert mp.plan_for(_est(14, 2), "gpu:0", free).problems == [
        "cuda:0: needs 16.00 GiB but the free memory on cuda:0 is 10.00 GiB"]


def test_a_share_may_use_its_fraction_of_the_gpu_only():
    free, totals = {"cuda:0": 70 * GiB}, {"cuda:0": 80 * GiB}
    assert mp.plan_for(_est(10, 5), "share:0", free, totals, memory_share=0.25).fits  # 15 <= 20
    p = mp.plan_for(_est(10, 15), "share:0", free, totals, memory_share=0.25)
    assert p.problems == ["cuda:0: needs 25.00 GiB but the 25% share of cuda:0 is 20.00 GiB"]
    # the share never counts memory another model already holds
    assert not mp.plan_for(_est(10, 5), "share:0", {"cuda:0": 12 * GiB}, totals, memory_share=0.5).fits


def test_a_refusal_names_the_model_the_placement_and_what_to_change(tiny_model_dir):
    est = mp.estimate(str(tiny_model_dir), 4, n_ctx=512, max_batch=16)
    with pytest.raises(mp.MemoryPlanError) as e:
        mp.decide("tiny", "cpu", mp.plan_for(est, "cpu", {"cpu": 100_000}))
    text = str(e.value)
    assert text.startswith("tiny does not fit on cpu: cpu: needs") and "available RAM is 0.1 MiB" in text
    assert f"for 16 requests x {est.n_ctx} tokens; lower max_batch" in text


def test_the_embedded_model_fits_in_this_machines_ram():
    from refact_lab.models.registry import resolve

    assert mp.available_ram() > 0
    p = mp.check_spec("default", resolve("default"), "cpu", "fp32", 16)
    assert p.fits and p.estimate.weights_from == "safetensors" and p.estimate.kv_bytes > 0


def test_a_gpu_placement_without_that_gpu_is_refused():
    torch = pytest.importorskip("torch")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(mp.MemoryPlanError, match=f"GPU {count} is not visible"):
        mp.plan("default", f"gpu:{count}", "bf16", 512, 1)


@pytest.mark.gpu
def test_a_gpu_plan_reads_the_gpus_free_memory():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    free, total = torch.cuda.mem_get_info(0)
    p = mp.plan("default", "share:0", "bf16", 512, 1, memory_share=0.5)
    assert p.fits and abs(p.free["cuda:0"] - min(free, total // 2)) < 2**30
    with pytest.raises(mp.MemoryPlanError, match="share of cuda:0"):
        mp.check("huge", "x/not-downloaded", "share:0", "bf16", registry_gb=total / 2**30, memory_share=0.5)


def test_the_first_model_is_refused_only_when_its_weights_cannot_fit():
    kv_too_big = mp.plan_for(_est(3, 10), "cpu", {"cpu": 8 * GiB})
    assert mp.decide("first", "cpu", kv_too_big, weights_only=True) is kv_too_big  # loads, as it always did
    with pytest.raises(mp.MemoryPlanError, match=r"hosted does not fit on cpu: cpu: needs 13.00 GiB .* KV cache "
                                                 r"10.00 GiB for 16 requests x 4096 tokens"):
        mp.decide("hosted", "cpu", kv_too_big)
    weights_too_big = mp.plan_for(_est(9, 1), "cpu", {"cpu": 8 * GiB})
    with pytest.raises(mp.MemoryPlanError, match="first does not fit on cpu"):
        mp.decide("first", "cpu", weights_too_big, weights_only=True)
