"""Hosted models placed on GPUs: one on gpu:0, one sharing GPU 0 within a memory share, one sharded over two GPUs
(when there are two), beside the first model on the CPU, each answering like the CPU reference.

Marked `gpu` and skipped without CUDA; run them on a GPU machine (`pytest -m gpu tests/serve`).
"""

from __future__ import annotations

import pytest

from refact_lab.home import Home
from refact_lab.serve import state
from refact_lab.serve.engine import Engine, SamplingParams
from refact_lab.serve.fleet import Fleet
from refact_lab.serve.state import HostedModel
from tests.serve.conftest import cut_at_special
from tests.serve.helpers import wait_for

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_models_on_a_gpu_a_gpu_share_and_a_shard_beside_one_on_the_cpu(tmp_path, varied_model_dir, reference):
    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model=str(varied_model_dir), device="cpu", dtype="fp32", loop_guard=False)
    entries = [HostedModel("on-gpu", str(varied_model_dir), placement="gpu:0", dtype="fp32"),
               HostedModel("shared", str(varied_model_dir), placement="share:0", memory_share=0.3, dtype="fp32")]
    if torch.cuda.device_count() >= 2:
        entries.append(HostedModel("sharded", str(varied_model_dir), placement="shard:0,1", dtype="fp32"))
    state.save_hosted(home, entries)
    fleet = Fleet(home, Engine(home)).start()
    try:
        wait_for(lambda: all(r["state"] in ("ready", "failed") for r in fleet.listing()), 300, 0.2, "all loaded")
        rows = {r["name"]: r for r in fleet.listing()}
        assert all(r["state"] == "ready" for r in rows.values()), rows
        assert rows["tinycoder"]["device"] == "cpu"
        assert rows["on-gpu"]["device"] == "cuda:0" and rows["shared"]["device"] == "cuda:0"
        if "sharded" in rows:
            assert rows["sharded"]["device"].startswith("shard") or rows["sharded"]["device"].startswith("cuda")
        prompt = "<|fim_prefix|>def area(r):\n    return <|fim_suffix|>\n\nprint(area(2))\n<|fim_middle|>"
        expected = cut_at_special(reference(prompt, 10))
        for name in rows:
            engine = fleet.engine_for(name)
            assert engine.generate(prompt, SamplingParams(max_tokens=10), model=name)["text"] == expected, name
    finally:
        fleet.stop()


def test_a_share_too_small_for_the_model_is_refused_with_the_numbers(tmp_path):
    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model="default", device="cpu")
    # 7B in bf16 is ~15 GiB of weights alone; 5% of any GPU this runs on is less. The plan refuses it before any
    # download or load is tried.
    total = torch.cuda.get_device_properties(0).total_memory
    if total * 0.05 > 16 * 2**30:
        pytest.skip("this GPU's 5% share could hold a 7B model")
    state.save_hosted(home, [HostedModel("small-share", "qwen2.5-coder-7b", placement="share:0", memory_share=0.05,
                                         dtype="bf16")])
    fleet = Fleet(home, Engine(home)).start()
    try:
        row = wait_for(lambda: next((r for r in fleet.listing() if r["name"] == "small-share"
                                     and r["state"] == "failed"), None), 120, 0.2, "refused")
        assert "small-share does not fit on share:0" in row["error"] and "5% share of cuda:0" in row["error"]
    finally:
        fleet.stop()
