"""Loading a base model and its tokenizer from a ModelSpec (embedded folder, local folder or hub id).

torch and transformers are imported inside the functions so importing refact_lab stays cheap.
"""

from __future__ import annotations

import threading

from refact_lab.models.registry import ModelSpec, resolve

MODEL_LOADING = threading.RLock()
"""Held by every model or adapter load in this process. transformers 5 patches class attributes process-wide
while `from_pretrained` runs (`PreTrainedModel.tie_weights` becomes a no-op, torch's init functions too), and
restores what it saw on entry: two loads in two threads at once leave one model's tied weights on the meta
device ("Cannot copy out of meta tensor"), and can leave the no-op patch in place for every later load. The
server loads in more than one thread (the engine, a LoRA switch, an export), so loads take turns."""


def load_tokenizer(spec: ModelSpec | str):
    from transformers import AutoTokenizer

    spec = resolve(spec) if isinstance(spec, str) or spec is None else spec
    return AutoTokenizer.from_pretrained(spec.source)


def cpu_info(field: str) -> str | None:
    """The first value of `field` ("flags", "model name", ...) in /proc/cpuinfo; None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16): there bf16 weights run prefill and
    batched decoding 2-3x faster than fp32. Elsewhere bf16 is emulated and slower, so fp32 stays the choice."""
    return bool(set((cpu_info("flags") or "").split()) & {"amx_bf16", "avx512_bf16"})


# Below this many weights a CPU decodes faster in fp32: oneDNN's bf16 matmul costs about 25 us more per call than
# fp32's at one row (measured on a Xeon with AMX: 37 us against 12 us for 320x864), which small matrices never earn
# back; from about a billion weights on, bf16 is as fast at one row and 3.5x faster at 16 (1536x8960).
CPU_BF16_MIN_PARAMS = 300_000_000


def auto_dtype(device: str, cpu_bf16: bool = True, params: int | None = None) -> str:
    """The precision `dtype=auto` means on this device (cpu, cuda, cuda:N, or shard / auto for a device map):
    bf16 on a GPU that supports it and, with `cpu_bf16`, on a CPU that computes it natively for a model of
    `params` weights (unknown: counted as large) of at least CPU_BF16_MIN_PARAMS; else fp32."""
    import torch

    if device == "cpu":
        large = params is None or params >= CPU_BF16_MIN_PARAMS
        return "bfloat16" if cpu_bf16 and large and cpu_has_native_bf16() else "float32"
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def load_model(spec: ModelSpec | str, device: str = "cpu", dtype: str | None = None):
    """Load the causal LM in eval mode. dtype: a torch dtype name, or None: bf16 on a GPU that supports it, fp32 on
    the CPU (the scan's loss filter keeps its fp32 numbers; the serving engine asks auto_dtype itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = resolve(spec) if isinstance(spec, str) or spec is None else spec
    torch_dtype = getattr(torch, dtype or auto_dtype(device, cpu_bf16=False))
    kwargs = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if device == "auto":
        kwargs["device_map"] = "auto"
    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise RuntimeError(f"{spec.source}: {len(empty)} weights were not loaded (first: {empty[0]}); "
                           "the model folder is incomplete")
    if device != "auto":
        model.to(device)
    model.eval()
    return model
