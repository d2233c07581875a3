"""LoRA setup: adapters on the registry's targets, B starting at zero, A scaled by lora_init_scale."""

import pytest
import torch

from refact_lab.config import FinetuneSettings
from refact_lab.finetune.lora import add_lora, target_modules


def _model(tiny_model_dir):
    from refact_lab.models.loading import load_model

    return load_model(str(tiny_model_dir))


def test_targets_are_the_registry_names_present_in_the_model(tiny_model_dir):
    model = _model(tiny_model_dir)
    assert target_modules(model, ("q_proj", "v_proj", "c_fc")) == ["q_proj", "v_proj"]
    # none present: every linear layer of the decoder, never the output head
    fallback = target_modules(model, ("c_attn",))
    assert "lm_head" not in fallback and {"q_proj", "down_proj"} <= set(fallback)


@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_init_scale_multiplies_the_initial_A_and_the_model_starts_unchanged(tiny_model_dir, scale):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = _model(tiny_model_dir)
    with torch.no_grad():
        before = base(input_ids=ids).logits
    torch.manual_seed(0)
    ref = add_lora(_model(tiny_model_dir), FinetuneSettings(lora_r=4, lora_init_scale=1.0), ["q_proj", "v_proj"])
    torch.manual_seed(0)
    scaled = add_lora(base, FinetuneSettings(lora_r=4, lora_init_scale=scale), ["q_proj", "v_proj"])
    ref_params, params = dict(ref.named_parameters()), dict(scaled.named_parameters())
    a_names = [n for n in params if ".lora_A." in n]
    assert len(a_names) == 4                                  # 2 layers x (q, v)
    for name in a_names:
        assert torch.allclose(params[name], ref_params[name] * scale)
        assert params[name].requires_grad
    assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if ".lora_B." in n)
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n)
    with torch.no_grad():
        assert torch.allclose(scaled(input_ids=ids).logits, before)
