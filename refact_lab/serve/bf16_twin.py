"""A bf16 copy of a small fp32 model for the wide work of serving on a CPU with bf16 instructions.

Small models serve in fp32 on a CPU (models/loading.auto_dtype): a one-row decode step is faster in fp32, because a
bf16 matrix product costs more per call than it saves on one row of a small matrix. Wide work is the other way
round: a prompt (tens or hundreds of rows at once), a batch of 16 requests stepping together, a draft being
verified. There AVX512-BF16 / AMX do the arithmetic 2-4x faster. So the engine keeps a bf16 twin of the model it
serves (half the fp32 weights' memory again) and runs through it every pass of at least `min_rows` rows (rows x
tokens). The KV cache stays fp32: the twin writes its keys and values into the same fp32 buffers and attends in
fp32 (serve/decode_step.py), and prompts it prefills have their cache widened to fp32, so the one-row steps
after them are the fp32 model's as before.

Where bf16 starts to pay differs per CPU (a 2-core AMD EPYC with AVX512-BF16, 320x864: fp32/bf16 18/31 us at one
row, 51/26 us at 4, 88/35 us at 16; the Xeon of an earlier session: 12/37 us at one row). So `calibrate` times
the model's own matrix shape in both precisions when the model loads (about 0.1 s) and `min_rows` is the
first row count from which bf16 is clearly faster; if it never is, no twin is kept.

The twin copies the model the engine calls, peft wrapper and LoRA adapters included (same adapter names, so the
engine's adapter switch applies to it as it is); the engine copies it again when adapters are loaded or removed.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64)
GAIN = 0.8  # bf16 must take at most this share of fp32's time to count as faster (noise and the cast)


def calibrate(hidden: int, wide: int, repeat: int = 30) -> dict[int, tuple[float, float]]:
    """Median microseconds of one `hidden` -> `wide` matrix product per row count: {rows: (fp32, bf16)}. The two
    precisions are timed in turns, so a busy moment of the machine falls on both."""
    import torch

    out = {}
    with torch.inference_mode():
        for rows in ROW_COUNTS:
            pairs = [(torch.randn(rows, hidden, dtype=d), torch.randn(wide, hidden, dtype=d))
                     for d in (torch.float32, torch.bfloat16)]
            samples: list[list[float]] = [[], []]
            for i in range(5 + repeat):
                for j, (x, w) in enumerate(pairs):
                    start = time.perf_counter()
                    torch.nn.functional.linear(x, w)
                    if i >= 5:  # the first calls warm up
                        samples[j].append(time.perf_counter() - start)
            fp32, bf16 = (1e6 * sorted(t)[len(t) // 2] for t in samples)
            out[rows] = (round(fp32, 1), round(bf16, 1))
    return out


def crossover(timings: dict[int, tuple[float, float]]) -> int | None:
    """The fewest rows, two at least, from which bf16 is clearly faster at every larger count measured (None:
    never). One row is the fp32 model's by choice (auto_dtype): a lucky timing must not move every step."""
    best = None
    for rows in sorted(timings, reverse=True):
        fp32, bf16 = timings[rows]
        if rows < 2 or bf16 > GAIN * fp32:
            break
        best = rows
    return best


class Bf16Twin:
    """The bf16 twin of one served fp32 model (see the module docstring)."""

    def __init__(self, model, min_rows: int, timings: dict | None = None):
        self.min_rows = min_rows
        self.timings = timings or {}
        self._source = None  # the engine's model object the twin copies (identity: a new wrapper means copy again)
        self.current = None  # the bf16 copy
        self.builds = 0
        self.passes = 0
        self.rows = 0
        self.bytes = sum(p.numel() * 2 for p in model.parameters())

    @classmethod
    def for_model(cls, model, device: str, dtype: str, requested: str) -> "Bf16Twin | None":
        """A twin when it pays: CPU, fp32 chosen by dtype=auto (an explicit fp32 is the user's wish for fp32
        numbers), a CPU that computes bf16 natively, and a matrix shape bf16 is measured to run faster."""
        from refact_lab.models.loading import cpu_has_native_bf16

        if device != "cpu" or dtype != "float32" or requested != "auto" or not cpu_has_native_bf16():
            return None
        cfg = getattr(model, "config", None)
        hidden = getattr(cfg, "hidden_size", None)
        if not isinstance(hidden, int):
            return None
        wide = getattr(cfg, "intermediate_size", None) or 4 * hidden
        timings = calibrate(hidden, wide)
        rows = crossover(timings)
        log.info("bf16 twin: %s (fp32/bf16 us per row count: %s)",
                 f"from {rows} rows" if rows else "not kept, bf16 is not faster here", timings)
        return cls(model, rows, timings) if rows else None

    def wants(self, rows: int) -> bool:
        """Whether a pass over `rows` rows (rows x tokens) goes through the twin."""
        return rows >= self.min_rows

    def model_for(self, model, fresh: bool = False):
        """The twin of `model` (the object the engine is about to call), copied now if it is new, or with `fresh`
        (adapters were loaded into or removed from the same wrapper)."""
        import torch

        if fresh or self.current is None or self._source is not model:
            self.current = None  # the old copy is released before the new one is made
            twin = copy.deepcopy(model).to(torch.bfloat16)
            twin.eval()
            self.current, self._source = twin, model
            self.builds += 1
        return self.current

    def base(self):
        """The twin's transformers model (inside peft's wrapper when adapters are loaded)."""
        twin = self.current
        return twin.get_base_model() if hasattr(twin, "get_base_model") else twin

    def counted(self, rows: int) -> None:
        self.passes += 1
        self.rows += rows

    def stats(self) -> dict[str, Any]:
        return {"dtype": "bfloat16", "min_rows": self.min_rows, "mib": round(self.bytes / 2**20, 1),
                "builds": self.builds, "passes": self.passes, "rows": self.rows,
                "timings_us": {str(k): list(v) for k, v in self.timings.items()}}


def widen(cache, dtype):
    """A cache holding `cache`'s keys and values converted to `dtype` (the decode steps' precision)."""
    from refact_lab.serve.batch import new_cache

    return new_cache([(layer.keys.to(dtype), layer.values.to(dtype)) for layer in cache.layers])
