"""Devices and memory before a fine-tuning run starts: which GPUs there are (with free memory), how a launch
resolves to processes and devices, and whether the run fits.

The estimate is arithmetic from the model's config (no weights are loaded), per device:
    weights       parameters x 2 bytes (bf16) or 4 (fp32); divided over the processes with FSDP
    LoRA          adapter parameters in fp32, their gradients (fp32) and AdamW's two fp32 moments
    activations   what the backward pass keeps for one micro batch of micro x seq_len tokens: every layer's
                  intermediate tensors, or with low_gpu_mem_mode (gradient checkpointing) only each layer's
                  input plus one layer recomputed at a time; plus the fused loss's logit chunk
    overhead      the CUDA context and allocator slack (1 GiB + 10%), or the Python runtime on a CPU
It is meant to be right within ~20%: enough to refuse a plan that cannot work and to switch on low-memory mode
when only that fits, before minutes are spent loading a model. A CUDA out-of-memory during training is still
retried once with low_gpu_mem_mode (trainer.fit).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from refact_lab.config import FinetuneSettings, LaunchSettings, SettingsError

GIB = 1024 ** 3
CUDA_FIXED_OVERHEAD = 1 * GIB      # CUDA context, cuBLAS workspace, NCCL buffers
CUDA_SLACK = 0.10                  # caching-allocator fragmentation
CPU_FIXED_OVERHEAD = GIB // 2      # the Python process with torch, transformers, peft imported
# The fused loss computes logits in chunks of about this many floats (trainer.LOGIT_BUDGET["cuda"]).
LOGIT_CHUNK_FLOATS = 2 ** 26


class MemoryPlanError(SettingsError):
    """The run cannot fit the devices it would run on; the message has the numbers."""


@dataclass(frozen=True)
class Device:
    """One device a run can train on, with the memory free on it now."""

    name: str            # "cuda:0" or "cpu"
    label: str           # "NVIDIA A10G" or "CPU"
    free: int            # bytes
    total: int           # bytes
    index: int | None = None

    def describe(self) -> str:
        return f"{self.name} {self.label}: {self.free / GIB:.1f} of {self.total / GIB:.1f} GiB free"


# --- devices -------------------------------------------------------------------------------------------------

def cpu_device() -> Device:
    """The CPU, with MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    info = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal", 0)
    return Device("cpu", "CPU", info.get("MemAvailable", total), total)


def _visible_ids() -> list[int] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    try:
        return [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        return None


def gpu_devices() -> list[Device]:
    """The GPUs this machine has (as CUDA_VISIBLE_DEVICES shows them) with their free memory; [] without any.

    NVML reads free memory without creating a CUDA context (a context would hold ~0.5 GiB of every GPU for
    the life of the server); without NVML, a short child process asks torch, so the context dies with it."""
    if not any(Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/nvidiactl")):
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            ids = _visible_ids()
            ids = list(range(pynvml.nvmlDeviceGetCount())) if ids is None else ids
            out = []
            for i, physical in enumerate(ids):
                handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                out.append(Device(f"cuda:{i}", name.decode() if isinstance(name, bytes) else str(name),
                                  int(mem.free), int(mem.total), i))
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML bindings or driver: ask torch in a child process
        pass
    import subprocess
    import sys

    code = ("import json, torch\n"
            "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
            "print(json.dumps([[torch.cuda.get_device_name(i), *torch.cuda.mem_get_info(i)] for i in range(n)]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        rows = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return []
    return [Device(f"cuda:{i}", name, int(free), int(total), i) for i, (name, free, total) in enumerate(rows)]


@dataclass(frozen=True)
class LaunchPlan:
    """A LaunchSettings with "auto" settled on this machine: how many processes on which devices."""

    processes: int
    cpu: bool
    gpus: tuple[int, ...]        # CUDA_VISIBLE_DEVICES of the run (empty on the CPU)
    fsdp: bool
    devices: tuple[Device, ...]  # what each process trains on (the CPU once: its processes share it)

    def describe(self) -> str:
        where = "CPU (gloo)" if self.cpu else f"GPU {','.join(map(str, self.gpus))}"
        return f"{self.processes} process{'es' if self.processes > 1 else ''} on {where}" + (
            ", FSDP" if self.fsdp else "")

    def to_dict(self) -> dict:
        # "num_processes" is what runs written before LaunchSettings stored; older readers still find it
        return {"processes": self.processes, "num_processes": self.processes, "cpu": self.cpu,
                "gpus": list(self.gpus), "fsdp": self.fsdp}


def plan_launch(launch: LaunchSettings, gpus: list[Device] | None = None) -> LaunchPlan:
    """Settle "auto": one process per chosen GPU, or 1 on the CPU (the CPU when forced or when there is no GPU).
    Raises SettingsError when the choice names GPUs that are not there or more processes than GPUs."""
    gpus = gpu_devices() if gpus is None and not launch.cpu else (gpus or [])
    if launch.cpu or not gpus:
        if launch.gpus:
            raise SettingsError(f"gpus: {','.join(map(str, launch.gpus))} chosen, but this machine has no GPU")
        if launch.fsdp:
            raise SettingsError("fsdp: needs GPUs; this run would train on the CPU")
        return LaunchPlan(launch.processes or 1, True, (), False, (cpu_device(),))
    by_index = {d.index: d for d in gpus}
    chosen = launch.gpus if launch.gpus is not None else sorted(by_index)
    missing = [g for g in chosen if g not in by_index]
    if missing:
        raise SettingsError(f"gpus: no GPU {','.join(map(str, missing))} here (there are: "
                            f"{', '.join(d.describe() for d in gpus)})")
    processes = launch.processes or len(chosen)
    if processes > len(chosen):
        raise SettingsError(f"processes: {processes} is more than the {len(chosen)} GPUs chosen (one process per "
                            "GPU; use --cpu for several CPU processes)")
    chosen = chosen[:processes]
    if launch.fsdp and processes < 2:
        raise SettingsError("fsdp: shards the model over several GPUs; choose at least 2")
    return LaunchPlan(processes, False, tuple(chosen), launch.fsdp, tuple(by_index[g] for g in chosen))


# --- the model's shape ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a decoder-only transformer's memory (from its config.json)."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool = True
    gated_mlp: bool = True        # Llama/Qwen: gate, up, down; StarCoder2/GPT: c_fc, c_proj
    qkv_bias: bool = False
    head_size: int = 0            # config.json's head_dim where it is not hidden / heads (Qwen3, Gemma)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block, by the name LoRA targets use."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        out = {"q_proj": (h, self.heads * self.head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
               "o_proj": (self.heads * self.head_dim, h)}
        if self.gated_mlp:
            out.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            out.update(c_fc=(h, i), c_proj=(i, h))
        return out

    @property
    def n_params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden   # + two norms
        if self.qkv_bias:
            per_layer += self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        if not self.gated_mlp:     # StarCoder2-style layers carry biases and LayerNorm biases
            per_layer += sum(b for _, b in self.linears().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden * (1 if self.gated_mlp else 2)

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.linears().items() if name in set(targets))


def shape_from_config(config: dict) -> ModelShape:
    """A ModelShape from a transformers config.json dict (Llama, Qwen2, Mistral, StarCoder2, GPT-BigCode...)."""
    def first(*keys, default=None):
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is None:
            raise ValueError(f"config.json has none of {', '.join(keys)}")
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    model_type = str(config.get("model_type") or "")
    gated = model_type not in ("starcoder2", "gpt_bigcode", "gpt2", "gpt_neox", "phi")
    kv = first("num_key_value_heads", default=1 if config.get("multi_query") else heads)
    return ModelShape(hidden=hidden, layers=int(first("num_hidden_layers", "n_layer")),
                      vocab=int(first("vocab_size")), intermediate=int(first("intermediate_size", "n_inner",
                                                                             default=4 * hidden)),
                      heads=heads, kv_heads=int(kv), tied=bool(config.get("tie_word_embeddings", True)),
                      gated_mlp=gated, qkv_bias=model_type == "qwen2", head_size=int(config.get("head_dim") or 0))


# Shapes of the registry's hub models (from their published config.json), so the estimate works before the
# model is downloaded, and the README's table of which sizes need what is computed, not guessed.
REFERENCE_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-Coder-0.5B": ModelShape(896, 24, 151936, 4864, 14, 2, True, qkv_bias=True),
    "Qwen/Qwen2.5-Coder-1.5B": ModelShape(1536, 28, 151936, 8960, 12, 2, True, qkv_bias=True),
    "Qwen/Qwen2.5-Coder-7B": ModelShape(3584, 28, 152064, 18944, 28, 4, False, qkv_bias=True),
    "Qwen/Qwen2.5-Coder-32B": ModelShape(5120, 64, 152064, 27648, 40, 8, False, qkv_bias=True),
    "bigcode/starcoder2-3b": ModelShape(3072, 30, 49152, 12288, 24, 2, True, gated_mlp=False),
    "bigcode/starcoder2-7b": ModelShape(4608, 32, 49152, 18432, 36, 4, True, gated_mlp=False),
    "deepseek-ai/deepseek-coder-1.3b-base": ModelShape(2048, 24, 32256, 5504, 16, 16, False),
    "codellama/CodeLlama-7b-hf": ModelShape(4096, 32, 32016, 11008, 32, 32, False),
    "codellama/CodeLlama-34b-hf": ModelShape(8192, 48, 32000, 22016, 64, 8, False),
}


def model_shape(source: str) -> ModelShape | None:
    """The shape of a model folder or hub id: its config.json (local, or in the hub cache), else the reference
    table; None when unknown (the run then starts without an estimate, and the log says so)."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if isinstance(cached, str):
            return shape_from_config(json.loads(Path(cached).read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - no cache, no hub library: fall back to the table
        pass
    return REFERENCE_SHAPES.get(source)


# --- the estimate ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs for a run, by part."""

    weights: int
    lora: int                 # adapter parameters + gradients + AdamW moments
    activations: int          # low_gpu_mem_mode off
    activations_low_mem: int  # low_gpu_mem_mode on (gradient checkpointing)
    overhead_fixed: int
    slack: float
    tokens: int               # per micro batch on one device

    def total(self, low_mem: bool) -> int:
        body = self.weights + self.lora + (self.activations_low_mem if low_mem else self.activations)
        return int(body * (1 + self.slack)) + self.overhead_fixed

    def describe(self, low_mem: bool) -> str:
        activations = self.activations_low_mem if low_mem else self.activations
        return (f"{self.total(low_mem) / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, LoRA + AdamW "
                f"{self.lora / GIB:.2f}, activations {activations / GIB:.1f} for {self.tokens:,} tokens per micro "
                "batch)")


def estimate(shape: ModelShape, settings: FinetuneSettings, *, processes: int = 1, targets=(), cpu: bool = False,
             fsdp: bool = False, weight_bytes: int | None = None) -> MemoryEstimate:
    """Memory one device needs. `settings.seq_len` must be settled (schedule.fit_to_model)."""
    if settings.seq_len is None:
        raise ValueError("estimate needs a settled seq_len (schedule.fit_to_model)")
    if weight_bytes is None:
        # the trainer stores frozen weights in bf16 where it computes in bf16: on a GPU with precision auto; on a
        # CPU that depends on its bf16 support, so fp32 is assumed there (the larger of the two)
        weight_bytes = 4 if settings.precision == "fp32" or (cpu and settings.precision != "bf16") else 2
    act = 2 if weight_bytes == 2 else 4
    per_process = max(1, settings.batch_size // processes)
    micro = min(settings.micro_batch_size or per_process, per_process)
    tokens = micro * settings.seq_len
    targets = targets or tuple(shape.linears())
    shard = processes if fsdp else 1
    n_lora = shape.lora_params(settings.lora_r, targets)
    lora = n_lora * 4 * 4 // shard                  # fp32 parameters, gradients, two AdamW moments
    h, kv, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    # Saved for the backward pass per token and layer, in elements (see the module docstring): two RMSNorms with
    # their fp32 copies (~4h each), q/k/v before and after rotary (2 x (h + 2kv)), the attention output and
    # o_proj's input (2h), the MLP's gate, up, activation and product (4i); LoRA dropout keeps a dropped copy
    # of each adapted layer's input
    per_layer = 8 * h + 2 * (h + 2 * kv) + 2 * h + 4 * i
    if settings.lora_dropout > 0:
        linears = shape.linears()
        per_layer += sum(linears[t][0] for t in targets if t in linears)
    per_layer_bytes = per_layer * act
    # the loss: one logit chunk (fp32, plus its bf16 copy) and the [tokens x hidden] gradient and hidden states
    loss = min(tokens * shape.vocab, LOGIT_CHUNK_FLOATS) * (4 + act) + tokens * h * (4 + act)
    full = tokens * shape.layers * per_layer_bytes + loss
    # checkpointing keeps each layer's input and recomputes one layer at a time in the backward pass
    low = tokens * shape.layers * h * act + tokens * per_layer_bytes + loss
    return MemoryEstimate(weights=shape.n_params * weight_bytes // shard, lora=lora, activations=full,
                          activations_low_mem=low, overhead_fixed=CPU_FIXED_OVERHEAD if cpu else CUDA_FIXED_OVERHEAD,
                          slack=0.0 if cpu else CUDA_SLACK, tokens=tokens)


@dataclass(frozen=True)
class FitDecision:
    """What the check decided: the low_gpu_mem_mode the run uses, and the line the run's log gets."""

    low_gpu_mem_mode: bool
    message: str
    need: int                 # bytes per device with that mode
    free: int                 # bytes on the tightest device


def check_fit(est: MemoryEstimate, plan: LaunchPlan, low_gpu_mem_mode: bool) -> FitDecision:
    """Compare the estimate with free memory: keep the settings, switch low_gpu_mem_mode on when only that fits,
    or raise MemoryPlanError with the numbers. On the CPU every process needs its own copy, from the same RAM."""
    share = plan.processes if plan.cpu else 1
    tight = min(plan.devices, key=lambda d: d.free)
    free = tight.free // share
    where = (f"{tight.name} ({plan.processes} processes share {tight.free / GIB:.1f} GiB available, "
             f"{free / GIB:.1f} each)" if share > 1 else f"{tight.name} has {tight.free / GIB:.1f} GiB free")
    full, low = est.total(False), est.total(True)
    if not low_gpu_mem_mode and full <= free:
        return FitDecision(False, f"memory: needs about {est.describe(False)} per process; {where}: fits", full, free)
    if low <= free:
        if low_gpu_mem_mode:
            return FitDecision(True, f"memory: needs about {est.describe(True)} per process with low_gpu_mem_mode; "
                                     f"{where}: fits", low, free)
        return FitDecision(True, f"memory: switched low_gpu_mem_mode on: without it the run needs about "
                                 f"{full / GIB:.1f} GiB per process, with it {est.describe(True)}; {where}", low, free)
    raise MemoryPlanError(
        f"not enough memory: the run needs about {est.describe(True)} per process even with low_gpu_mem_mode "
        f"({full / GIB:.1f} GiB without); {where}. Lower micro_batch_size or seq_len, use --fsdp over more GPUs, "
        "or a smaller model")


def memory_check(source: str, settings: FinetuneSettings, plan: LaunchPlan, targets=()) -> FitDecision | None:
    """The estimate for a model source against the plan's devices; None when the model's shape is unknown."""
    try:
        shape = model_shape(source)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OSError):
        shape = None   # a config this arithmetic does not know (multimodal, nested): no estimate, not a refusal
    if shape is None:
        return None
    est = estimate(shape, settings, processes=plan.processes, targets=targets, cpu=plan.cpu, fsdp=plan.fsdp)
    return check_fit(est, plan, settings.low_gpu_mem_mode)
