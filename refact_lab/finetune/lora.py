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


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
