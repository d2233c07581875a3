"""The memory plan: will a hosted model fit where it is placed, before anything is loaded?

Per entry of the hosting list: the weights (the safetensors headers' tensor shapes give the parameter count
exactly; else the weight files' size; else the registry's rough figure) at the chosen dtype, plus the KV cache a
full batch at full context takes (layers x KV heads x head dim x context x max_batch x 2 (K and V) x bytes),
against the free memory of the devices the placement uses: the CPU's available RAM (MemAvailable, bounded by
the process's cgroup limit) or each GPU's free memory (torch.cuda.mem_get_info). The server's first model (a
single-model home, as before this list existed) is refused only when its weights cannot fit: its KV cache grows
with use, and a home that served fine must keep serving. A `shard:` placement splits
both evenly over its GPUs (accelerate balances layers); a `share:` placement may use at most its memory share of
the GPU's total. A placement that cannot fit is refused with the numbers, so the user sees why instead of an
out-of-memory error in the middle of a load (or of a batch).

Pure functions of the model's files and a `free` dict, so the unit tests run everywhere; `free_memory` is the
one place that asks the machine.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("refact_lab.memory_plan")

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


class MemoryPlanError(ValueError):
    """The placement cannot hold the model: the message gives the estimate and the free memory."""


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int
    kv_bytes: int | None          # None: the model's config is not at hand (a hub id not downloaded)
    params: int | None
    weights_from: str             # "safetensors", "weight files", "registry"
    n_ctx: int
    max_batch: int
    twin_bytes: int = 0           # a bf16 copy of a small fp32 model on a CPU (serve/bf16_twin.py)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + (self.kv_bytes or 0) + self.twin_bytes


@dataclass(frozen=True)
class Plan:
    estimate: Estimate
    need: dict[str, int]          # device ("cpu", "cuda:0") -> bytes this entry needs there
    free: dict[str, int]          # device -> bytes it may use there
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        e = self.estimate
        kv = "unknown KV cache" if e.kv_bytes is None else \
            f"KV cache {gib(e.kv_bytes)} ({e.max_batch} x {e.n_ctx} tokens)"
        where = ", ".join(f"{d}: needs {gib(self.need[d])} of {gib(self.free[d])} free" for d in self.need)
        twin = f" + bf16 copy {gib(e.twin_bytes)}" if e.twin_bytes else ""
        return f"weights {gib(e.weights_bytes)} ({e.weights_from}){twin} + {kv}; {where}"


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


# ---- what the model needs -------------------------------------------------------------------------------------

def safetensors_params(folder: Path) -> int | None:
    """The parameter count from the safetensors files' headers (no tensor is read)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                return None  # not a safetensors header
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            n = 1
            for d in info.get("shape", []):
                n *= int(d)
            total += n
    return total


def model_folder(source: str) -> Path | None:
    """The local folder holding a model's files: the folder itself, or a hub id's snapshot in the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def read_config(folder: Path | None) -> dict | None:
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    # multimodal / nested configs keep the language model's numbers in text_config
    return config.get("text_config", config) if isinstance(config, dict) else None


def kv_bytes(config: dict, n_ctx: int, max_batch: int, dtype_bytes: int) -> int | None:
    """Keys and values of every layer for a full batch at full context."""
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not (layers and heads and hidden):
        return None
    head_dim = config.get("head_dim") or hidden // heads
    return int(layers) * int(kv_heads) * int(head_dim) * n_ctx * max_batch * 2 * dtype_bytes


def estimate(source: str, dtype_bytes: int, n_ctx: int, max_batch: int, registry_gb: float = 0.0) -> Estimate:
    """What a model needs: weights at `dtype_bytes` per parameter, and the KV cache of a full batch."""
    folder = model_folder(source)
    config = read_config(folder)
    if config and isinstance(config.get("max_position_embeddings"), int):
        n_ctx = min(n_ctx, config["max_position_embeddings"])
    params = safetensors_params(folder) if folder else None
    if params:
        weights, origin = params * dtype_bytes, "safetensors"
    elif folder and list(folder.glob("*.bin")):
        # a .bin checkpoint's size is its parameters at the stored dtype (usually 2 bytes)
        stored = sum(p.stat().st_size for p in folder.glob("*.bin"))
        params = stored // 2
        weights, origin = params * dtype_bytes, "weight files"
    else:
        weights, origin = int(registry_gb * GiB * dtype_bytes / 2), "registry"
    kv = kv_bytes(config, n_ctx, max_batch, dtype_bytes) if config else None
    return Estimate(weights, kv, params, origin, n_ctx, max_batch)


# ---- what the machine has -------------------------------------------------------------------------------------

def available_ram() -> int:
    """RAM this process may still take: MemAvailable (as the trainer's plan reads it), bounded by its cgroup's
    limit when it has one."""
    from refact_lab.finetune.memory import cpu_device

    free = cpu_device().free
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return free


def gpu_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of GPU `index`, read as the trainer's plan reads them (NVML, or a short child process:
    no CUDA context is created in this process just to plan)."""
    from refact_lab.finetune.memory import gpu_devices

    gpus = {d.index: d for d in gpu_devices()}
    if index not in gpus:
        raise MemoryPlanError(f"GPU {index} is not visible (this machine has {len(gpus)} GPU(s))")
    return gpus[index].free, gpus[index].total


def resolve_placement(placement: str) -> str:
    """`auto` as the engine reads it: GPU 0 when there is one, else the CPU."""
    if placement != "auto":
        return placement
    import torch

    return "gpu:0" if torch.cuda.is_available() else "cpu"


def source_params(source: str) -> int | None:
    """The parameter count of a local model folder's safetensors (None: not local, or no safetensors)."""
    folder = model_folder(source)
    return safetensors_params(folder) if folder else None


def dtype_bytes_for(dtype: str, placement: str, params: int | None = None) -> int:
    if dtype != "auto":
        return DTYPE_BYTES[dtype]
    from refact_lab.models.loading import auto_dtype

    return DTYPE_BYTES[auto_dtype("cpu" if placement == "cpu" else "cuda", params=params)]


def may_keep_twin(source: str, placement: str, dtype: str, est: Estimate) -> bool:
    """Whether the engine may keep a bf16 copy beside the fp32 weights (it decides after timing both at load)."""
    from refact_lab.models.loading import cpu_has_native_bf16
    from refact_lab.serve.bf16_twin import MIN_HIDDEN

    if placement != "cpu" or dtype != "auto" or not est.params or est.weights_bytes != est.params * 4:
        return False
    config = read_config(model_folder(source)) or {}
    return (config.get("hidden_size") or 0) >= MIN_HIDDEN and cpu_has_native_bf16()


# ---- the plan ---------------------------------------------------------------------------------------------

def plan_for(est: Estimate, placement: str, free: dict[str, int], totals: dict[str, int] | None = None,
             memory_share: float = 1.0) -> Plan:
    """Split `est` over the placement's devices and compare with `free` (device -> bytes free; `totals` for a
    share). Pure: the tests give the numbers."""
    from refact_lab.serve.state import placement_gpus

    gpus = placement_gpus(placement)
    devices = [f"cuda:{i}" for i in gpus] or ["cpu"]
    per_device = -(-est.total_bytes // len(devices))
    need, budget, problems = {}, {}, []
    for d in devices:
        room = free.get(d, 0)
        if placement.startswith("share:") and totals and d in totals:
            room = min(room, int(totals[d] * memory_share))
        need[d], budget[d] = per_device, room
        if per_device > room:
            what = f"{memory_share:.0%} share of {d}" if placement.startswith("share:") else \
                ("available RAM" if d == "cpu" else f"free memory on {d}")
            problems.append(f"{d}: needs {gib(per_device)} but the {what} is {gib(room)}")
    return Plan(est, need, budget, problems)


def plan(source: str, placement: str, dtype: str = "auto", n_ctx: int = 4096, max_batch: int = 16,
         memory_share: float = 1.0, registry_gb: float = 0.0) -> Plan:
    """The plan for a model on this machine now."""
    from refact_lab.serve.state import placement_gpus

    placement = resolve_placement(placement)
    est = estimate(source, dtype_bytes_for(dtype, placement, source_params(source)), n_ctx, max_batch, registry_gb)
    if may_keep_twin(source, placement, dtype, est):
        est = replace(est, twin_bytes=est.params * 2)
    free, totals = {}, {}
    gpus = placement_gpus(placement)
    if gpus:
        for i in gpus:
            free[f"cuda:{i}"], totals[f"cuda:{i}"] = gpu_memory(i)
    else:
        free["cpu"] = available_ram()
    return plan_for(est, placement, free, totals, memory_share)


def check(name: str, source: str, placement: str, dtype: str = "auto", n_ctx: int = 4096, max_batch: int = 16,
          memory_share: float = 1.0, registry_gb: float = 0.0, weights_only: bool = False) -> Plan:
    """The plan for this machine now, or MemoryPlanError naming the model, the placement and the numbers."""
    return decide(name, placement, plan(source, placement, dtype, n_ctx, max_batch, memory_share, registry_gb),
                  weights_only)


def decide(name: str, placement: str, p: Plan, weights_only: bool = False) -> Plan:
    """`p`, or MemoryPlanError when it does not fit. `weights_only`: refuse only when the weights alone cannot
    fit (a full KV cache that does not is logged)."""
    if not p.fits and weights_only:
        lean = plan_for(replace(p.estimate, kv_bytes=None, twin_bytes=0), placement, p.free)
        if lean.fits:
            log.warning("%s: a full KV cache would not fit on %s (%s); loading it anyway", name, placement,
                        "; ".join(p.problems))
            return p
    if not p.fits:
        e = p.estimate
        raise MemoryPlanError(f"{name} does not fit on {placement}: {'; '.join(p.problems)} "
                              f"(weights {gib(e.weights_bytes)}"
                              f"{f' + bf16 copy {gib(e.twin_bytes)}' if e.twin_bytes else ''} + KV cache "
                              f"{'unknown' if e.kv_bytes is None else gib(e.kv_bytes)} for "
                              f"{e.max_batch} requests x {e.n_ctx} tokens; lower max_batch, pick a smaller "
                              "dtype or another placement)")
    return p


def check_spec(name: str, spec, placement: str, dtype: str, max_batch: int, memory_share: float = 1.0,
               weights_only: bool = False) -> Plan:
    """`check` for a registry ModelSpec (what the engine and the hosting service hold)."""
    return check(name, spec.source, placement, dtype, spec.n_ctx, max_batch, memory_share, spec.memory_gb,
                 weights_only)


def placement_of_device(device: str, gpu_memory_fraction: float = 1.0) -> str:
    """Entry one's engine device (cpu, cuda, cuda:N, shard: already resolved from auto) as a placement."""
    if device.startswith("cuda"):
        index = device.split(":")[1] if ":" in device else "0"
        return f"share:{index}" if gpu_memory_fraction < 1.0 else f"gpu:{index}"
    if device == "shard":
        import torch

        n = torch.cuda.device_count()
        return "gpu:0" if n == 1 else "shard:" + ",".join(str(i) for i in range(n))
    return "cpu"
