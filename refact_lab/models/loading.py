"""Loading a base model and its tokenizer from a ModelSpec (embedded folder, local folder or hub id).

torch and transformers are imported inside the functions so importing refact_lab stays cheap.
"""

from __future__ import annotations

from refact_lab.models.registry import ModelSpec, resolve


def load_tokenizer(spec: ModelSpec | str):
    from transformers import AutoTokenizer

    spec = resolve(spec) if isinstance(spec, str) or spec is None else spec
    return AutoTokenizer.from_pretrained(spec.source)


def load_model(spec: ModelSpec | str, device: str = "cpu", dtype: str | None = None):
    """Load the causal LM in eval mode. dtype: None (bf16 on CUDA that supports it, else fp32), or a name."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = resolve(spec) if isinstance(spec, str) or spec is None else spec
    if dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if device == "auto":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    return model
