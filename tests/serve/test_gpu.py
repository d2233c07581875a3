"""Hosting on GPUs: one GPU, sharded over every GPU (accelerate's device map), and a share of one GPU.

Marked `gpu` and skipped without CUDA; run them on a GPU machine (`pytest -m gpu tests/serve`).
"""

from __future__ import annotations

import pytest

from refact_lab.home import Home
from refact_lab.serve.engine import Engine, SamplingParams

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def serve(tmp_path, model_dir, **settings) -> Engine:
    home = Home.resolve(tmp_path / "home").ensure()
    home.update_settings(model=str(model_dir), **settings)
    return Engine(home).start().wait_ready(300)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "shard"])
def test_model_on_gpu_matches_the_cpu_reference(tmp_path, varied_model_dir, reference, device):
    from tests.serve.conftest import cut_at_special

    # fp32 and no loop guard: the answer is compared with plain greedy generate on the CPU
    engine = serve(tmp_path, varied_model_dir, device=device, dtype="fp32", loop_guard=False)
    try:
        snap = engine.snapshot()
        assert snap["device"].startswith(("cuda", "shard")) and snap["memory"]["gpus"][0]["allocated_mb"] > 0
        prompt = "def fib(n):\n    if n < 2:\n        return"
        assert engine.generate(prompt, SamplingParams(max_tokens=8))["text"] == cut_at_special(reference(prompt, 8))
    finally:
        engine.stop()


def test_sharing_a_gpu_caps_this_process_memory(tmp_path, varied_model_dir):
    engine = serve(tmp_path, varied_model_dir, device="cuda", gpu_memory_fraction=0.25)
    try:
        total = torch.cuda.get_device_properties(0).total_memory
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(total * 0.5), dtype=torch.uint8, device="cuda")  # more than our quarter
        assert engine.generate("x = 1", SamplingParams(max_tokens=4))["finish_reason"] in ("stop", "length")
    finally:
        engine.stop()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
