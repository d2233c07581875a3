"""LoRA setup with peft: which layers get adapters, and the initial scale of the A matrices.

peft starts every adapter with B = 0 (so the model is unchanged at step 0) and A random (Kaiming-uniform).
`lora_init_scale` multiplies that initial A: the first updates of B are proportional to A, so a smaller A
makes the first steps gentler.
"""

from __future__ import annotations

from typing import Sequence

from refact_lab.config import FinetuneSettings


def target_modules(model, preferred: Sequence[str]) -> list[str]:
    """The registry's LoRA targets that exist in this model; without any, every linear layer of the decoder
    (never the output head, which is tied to the embeddings in many code models)."""
    import torch

    linear_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear)}
    present = [t for t in preferred if t in linear_names]
    if present:
        return present
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and mod is not head})


def add_lora(model, settings: FinetuneSettings, targets: Sequence[str]):
    """Wrap `model` in a peft LoRA model (only the adapters train) and scale the initial A matrices."""
    import torch
    from peft import LoraConfig, get_peft_model

    if not targets:
        raise ValueError("the model has no linear layers to put LoRA adapters on")
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if settings.lora_init_scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name:
                    param.mul_(settings.lora_init_scale)
    return peft_model


def load_adapter_weights(peft_model, folder) -> None:
    """Start from a saved adapter (adapter_model.safetensors in `folder`) instead of fresh LoRA weights.
    The adapter must have the same rank and target layers: a mismatch is a ValueError naming both."""
    import json
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"init adapter {folder}: no adapter_model.safetensors")
    saved = json.loads((folder / "adapter_config.json").read_text()) if (folder / "adapter_config.json").is_file() \
        else {}
    config = peft_model.peft_config["default"]
    if saved and (saved.get("r") != config.r or set(saved.get("target_modules") or ()) != set(config.target_modules)):
        raise ValueError(f"init adapter {folder}: LoRA r={saved.get('r')} on {sorted(saved.get('target_modules') or ())}"
                         f" does not match this run's r={config.r} on {sorted(config.target_modules)}")
    result = set_peft_model_state_dict(peft_model, load_file(str(weights)))
    # peft names the LoRA tensors it did not find as unexpected keys: none may be missing from the file
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"init adapter {folder}: {len(result.unexpected_keys)} tensors do not fit this model")


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
