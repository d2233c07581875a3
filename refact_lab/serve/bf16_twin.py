"""A bf16 copy of a small fp32 model for the passes of serving that run faster in bf16 on this CPU.

Small models serve in fp32 on a CPU (models/loading.auto_dtype): on the Xeon of an earlier session a one-row decode
step was faster in fp32, because a bf16 matrix product cost more per call than it saved on one row of a small
matrix. Wide passes are the other way round: a prompt (tens or hundreds of rows at once), a batch of 16 requests
stepping together. There AVX512-BF16 / AMX do the arithmetic 2-4x faster. Where the crossover lies differs per CPU:
on this project's 2-core AMD EPYC (AVX512-BF16) the embedded model's whole forward pass was already 0.85x in bf16
at one row (the weights stream from memory at half the bytes), 0.7-0.8x from 2 to 32 rows; a 320x864 product
timed alone, hot in cache, was 1.7x slower at one row there. Most of that cost per call was F.linear reordering
the bf16 weight for oneDNN each time: the engine's decode step keeps its weights prepacked (serve/decode_step.py),
and there a one-row bf16 step took 1.96 ms against fp32's 3.9 ms.

So the engine keeps a bf16 twin of the model it serves (half the fp32 weights' memory again) and times both at
load, fp32 and bf16 in turns (`calibrate`, about 1.2 s for the embedded model): decode steps of 1 to 16 rows on a
short cache, through the engine's own step (serve/decode_step.py), and prompts of 16 to 128 tokens. A step of at
least `min_rows` rows, and a prompt (or the uncached rest of one) of at least `min_tokens` tokens, then run
through the twin: from the smallest size where bf16 is not slower and is clearly faster over that size and the
larger ones (`crossover`); if there is none for either, no twin is kept. The KV cache stays fp32: the twin writes its keys and values into the same fp32 buffers and attends in
fp32, and prompts it prefills have their cache widened to fp32. Below MIN_HIDDEN wide the matrices are too small
for bf16 to pay (a hidden-64 test model: 200 prompt tokens 1.6 ms fp32, 1.9 ms bf16), so no twin is timed or kept.

The twin copies the model the engine calls, peft wrapper and LoRA adapters included (same adapter names, so the
engine's adapter switch applies to it as it is); the engine copies it again when adapters are loaded or removed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEP_ROWS = (1, 2, 4, 8, 16)
PROMPT_TOKENS = (16, 32, 64, 128)
GAIN = 0.9  # bf16 must take at most this share of fp32's time to count as faster (noise and the cast)
MIN_HIDDEN = 256
REPEAT = 10
# Part of the remembered choice's key: raised when the timed passes change (2: bf16 weights prepacked), so a home
# times them again instead of keeping a choice made for slower code
TIMED_CODE = 2


def _timed_in_turns(calls, repeat: int = REPEAT) -> tuple[float, float]:
    """Median milliseconds of each of two calls, run in turns after two warm-up rounds."""
    samples: list[list[float]] = [[] for _ in calls]
    for i in range(2 + repeat):
        for j, call in enumerate(calls):
            began = time.perf_counter()
            call()
            if i >= 2:
                samples[j].append(time.perf_counter() - began)
    fp32, bf16 = (1000 * sorted(t)[len(t) // 2] for t in samples)
    return round(fp32, 3), round(bf16, 3)


def calibrate(model, twin, decoder=None) -> dict[str, dict[int, tuple[float, float]]]:
    """Milliseconds (fp32 model, bf16 twin): {"step": {rows: ...}} for one decode step of that many rows on a
    64-column cache through `decoder` (a LeanDecoder; no step timings without one), {"prompt": {tokens: ...}}
    for a prompt of that many tokens."""
    import torch

    from refact_lab.serve.batch import cache_kwarg, new_cache
    from refact_lab.serve.decode_step import _step

    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    out: dict[str, dict[int, tuple[float, float]]] = {"step": {}, "prompt": {}}
    with torch.inference_mode():
        if decoder is not None:
            twin_base = twin.get_base_model() if hasattr(twin, "get_base_model") else twin
            for rows in STEP_ROWS:
                cache = new_cache()
                model(input_ids=torch.randint(0, vocab, (rows, 64), device=device), use_cache=True,
                      logits_to_keep=1, **{cache_kwarg(model): cache})
                bufs = [layer.reserve(1) for layer in cache.layers]
                kbufs, vbufs = [k for k, _ in bufs], [v for _, v in bufs]
                ids = torch.randint(0, vocab, (rows, 1), device=device)
                positions = torch.full((rows, 1), 64, dtype=torch.long, device=device)
                # both write column 64 of the same buffers again and again: the work of one step each time
                out["step"][rows] = _timed_in_turns([
                    lambda m=m: _step(m, ids, positions, kbufs, vbufs, 64, None, decoder.fused_for(m))
                    for m in (decoder.model, twin_base)])
        for tokens in PROMPT_TOKENS:
            ids = torch.randint(0, vocab, (1, tokens), device=device)
            out["prompt"][tokens] = _timed_in_turns([lambda m=m: m(input_ids=ids, logits_to_keep=1)
                                                     for m in (model, twin)])
    return out


def _machine_key(model, threads: int) -> str:
    """What a calibration's outcome depends on: the model's shape, the CPU, torch's version and threads, and the
    code timed."""
    import platform

    import torch

    from refact_lab.models.loading import cpu_info

    cfg = model.config
    shape = [getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "intermediate_size", "vocab_size")]
    cpu = cpu_info("model name") or platform.processor() or platform.machine()
    return json.dumps([shape, cpu, os.cpu_count(), torch.__version__, threads, TIMED_CODE])


def crossover(timings: dict[int, tuple[float, float]]) -> int | None:
    """The fewest rows where bf16 is not slower and, over that size and every larger one, is clearly faster
    (median ratio at most GAIN); None: no such size. One size measured slow by a busy moment does not move the
    choice, as a rule of "faster at every larger size" would."""
    import statistics

    sizes = sorted(timings)
    ratio = {r: timings[r][1] / timings[r][0] for r in sizes if timings[r][0] > 0}
    for i, r in enumerate(sizes):
        if r in ratio and ratio[r] <= 1.0 and statistics.median(ratio[x] for x in sizes[i:] if x in ratio) <= GAIN:
            return r
    return None


class Bf16Twin:
    """The bf16 twin of one served fp32 model (see the module docstring)."""

    def __init__(self, model, min_rows: int | None, min_tokens: int | None = None):
        self.min_rows = min_rows  # decode steps of at least this many rows run in the twin (None: none do)
        self.min_tokens = min_tokens  # ...and prompts or rests of at least this many tokens
        self.timings: dict = {}  # what `calibrate` measured at load
        self._source = None  # the engine's model object the twin copies (identity: a new wrapper means copy again)
        self.current = None  # the bf16 copy
        self.builds = 0
        self.passes = 0
        self.rows = 0
        self.bytes = sum(p.numel() * 2 for p in model.parameters())

    @classmethod
    def for_model(cls, model, device: str, dtype: str, requested: str, decoder=None,
                  remember: Path | None = None) -> "Bf16Twin | None":
        """A twin when it pays: CPU, fp32 chosen by dtype=auto (an explicit fp32 is the user's wish for fp32
        numbers), a CPU that computes bf16 natively, and passes that `calibrate` measured faster in bf16.

        `remember`: a JSON file keeping each calibration's outcome per model shape, CPU, torch version and thread
        count: the next load of the same shape on the same machine takes the same choice. Timings move with the
        machine's load, and a choice that changed between two loads would change some greedy completions (bf16
        rounds differently), so two scoreboard runs of the same inputs would differ."""
        import torch

        from refact_lab.home import atomic_write_json, read_json
        from refact_lab.models.loading import cpu_has_native_bf16

        if device != "cpu" or dtype != "float32" or requested != "auto" or not cpu_has_native_bf16():
            return None
        if (getattr(getattr(model, "config", None), "hidden_size", 0) or 0) < MIN_HIDDEN:
            return None
        twin = cls(model, None)
        key = _machine_key(model, torch.get_num_threads())
        known = (read_json(remember, {}) or {}).get(key) if remember is not None else None
        if isinstance(known, dict) and {"min_rows", "min_tokens", "timings"} <= set(known):
            twin.min_rows, twin.min_tokens = known["min_rows"], known["min_tokens"]
            twin.timings = {kind: {int(k): tuple(v) for k, v in t.items()} for kind, t in known["timings"].items()}
            if twin.min_rows or twin.min_tokens:
                twin.model_for(model)  # copied now, not on the first request
            log.info("bf16 twin: steps from %s rows, prompts from %s tokens (as timed at an earlier load)",
                     twin.min_rows, twin.min_tokens)
        else:
            twin.timings = calibrate(model, twin.model_for(model), decoder)
            twin.min_rows = crossover(twin.timings["step"])
            twin.min_tokens = crossover(twin.timings["prompt"])
            log.info("bf16 twin: steps from %s rows, prompts from %s tokens (fp32 / bf16 ms: %s)",
                     twin.min_rows, twin.min_tokens, twin.timings)
            if remember is not None:
                try:
                    known_all = read_json(remember, {}) or {}
                    known_all[key] = {"min_rows": twin.min_rows, "min_tokens": twin.min_tokens,
                                      "timings": {kind: {str(k): list(v) for k, v in t.items()}
                                                  for kind, t in twin.timings.items()}}
                    atomic_write_json(remember, known_all)
                except OSError as e:  # a read-only home still serves; it only times again next load
                    log.warning("bf16 twin: could not remember the timing in %s: %s", remember, e)
        return twin if twin.min_rows or twin.min_tokens else None

    def wants_step(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows (or a check of one row's drafts, rows=1) runs in the twin."""
        return self.min_rows is not None and rows >= self.min_rows

    def wants_prompt(self, tokens: int) -> bool:
        """Whether a prompt, or the rest of one after reused columns, of `tokens` tokens in all runs in the twin."""
        return self.min_tokens is not None and tokens >= self.min_tokens

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
        return {"dtype": "bfloat16", "min_rows": self.min_rows, "min_tokens": self.min_tokens,
                "mib": round(self.bytes / 2**20, 1), "builds": self.builds, "passes": self.passes, "rows": self.rows,
                "timings_ms": {kind: {str(k): list(v) for k, v in t.items()} for kind, t in self.timings.items()}}


def widen(cache, dtype):
    """A cache holding `cache`'s keys and values converted to `dtype` (the decode steps' precision)."""
    from refact_lab.serve.batch import new_cache

    return new_cache([(layer.keys.to(dtype), layer.values.to(dtype)) for layer in cache.layers])
