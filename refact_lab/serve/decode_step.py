"""The engine's decode step for Llama-shaped models, without transformers' generic forward around it.

A decode step of a small model is mostly framework overhead, not arithmetic: transformers' forward builds masks,
cache objects, output dataclasses and keyword plumbing on every call. For the architectures whose decoder layer is
the Llama one (llama, mistral without a sliding window, qwen2, qwen3), `LeanDecoder` runs the same modules of the
loaded model (so peft's LoRA layers, norms, MLPs and rotary embeddings are the model's own) and writes keys and
values straight into the batch's preallocated cache buffers (`batch.SlackLayer`: a step writes one column in place;
the buffer grows by half when full).

With `compile=True` the step for one token per row goes through `torch.compile` (dynamic shapes: one graph serves
every batch size and cache length; on a GPU the generated kernels run there too). `warm_up()` compiles those graphs
at model load, so no user's request pays for it; the engine shows the time in Model hosting. While LoRA adapters
are loaded the eager step runs instead (peft switches adapters with Python state a compiled graph would freeze).

On a CPU, a small model's q/k/v projections run as one matrix product and its MLP's gate/up as another
(`fuse_projections`: copies, only of plain linear layers, so a LoRA-wrapped layer keeps its own modules): a product
of one row costs mostly its call there. In bf16 every product's weight is also prepacked for oneDNN (`Projection`),
which F.linear would reorder again on each call; RMS norms run as torch's one `rms_norm` op and queries and keys
rotate in one go (each checked to give the same bits; greedy tokens do not move).

A pass whose rows were fed different numbers of tokens (newcomers' prompt rests beside running rows' last tokens
and drafts, `Batch.feed`) runs its norms, projections and MLPs over the real tokens only, and the logits' head over
the positions the engine reads (16 typing clients on this project's CPU: 15 rows x 3.3 tokens a pass, of which
32 slots real and 30 logits read, out of 50). Only the attention sees the padded layout (its columns are the cache's). The products of
each token are the same ones, so the logits keep their bits.

Everything else (prefill of fresh prompts, models of other architectures) keeps transformers' forward. Greedy tokens
equal that forward's (tests/serve/test_decode_step.py compares them, padded batches and drafts included).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3")


def _unsupported(model) -> str | None:
    """Why this model cannot take the lean step (None: it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in LLAMA_SHAPED:
        return f"architecture {kind!r} (the lean step knows {', '.join(LLAMA_SHAPED)})"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
            cfg.sliding_window < getattr(cfg, "max_position_embeddings", 0):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no rotary embedding module"
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        return "layers split over several devices"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "tensor-parallel pretraining layout"
    for layer in inner.layers:
        a = getattr(layer, "self_attn", None)
        if a is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                                                          "scaling")):
            return "an attention module of another shape"
    return None


def _step(model, ids, positions, kbufs: list, vbufs: list, n: int, mask, fused=None, fed=None, want=None):
    """Logits [rows, tokens, vocab] of `ids` [rows, tokens] at `positions`; their keys and values are written into
    columns n.. of each layer's buffers (converted to the buffers' dtype), and attention reads columns ..n+tokens.
    `mask`: None (every column of every row is real and tokens == 1) or bool [rows, 1, tokens, columns].
    `fused`: the model's projections with q/k/v and gate/up in one matrix each (`fuse_projections`), or None.

    `fed` (bool [rows, tokens], None: all) marks the tokens that are real: the others are padding of a pass whose
    rows were fed different numbers of tokens, and only the attention sees them (their keys and values are zeros,
    masked out); norms, projections and MLPs run over the real tokens alone (`_Packing`). `want` (bool
    [rows, tokens] within `fed`, None: all) marks the positions whose logits the caller reads: the logits' head
    runs for those, and the other positions' logits are zeros."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    inner = model.model
    rows, tokens = ids.shape
    packing = _Packing.of(fed, want, rows, tokens)
    x = inner.embed_tokens(packing.pack_ids(ids))
    cos, sin = inner.rotary_emb(x, positions)  # x gives only the dtype and device
    cos_h, sin_h = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        shape = (rows, tokens, -1, a.head_dim)
        if fused is not None:
            f = fused[i]
            h = f.attn_norm(x)
            qkv = packing.spread(f.qkv(h))
            q_size, k_size, _ = f.qkv_sizes
            v = qkv[..., q_size + k_size:].reshape(shape)
            if f.qk_together:  # queries and keys rotated in one go: the same products, half the calls
                qk = qkv[..., :q_size + k_size].reshape(shape).transpose(1, 2)
                qk = qk * cos_h + rotate_half(qk) * sin_h
                q, k = qk[:, :q_size // a.head_dim], qk[:, q_size // a.head_dim:]
            else:
                q, k = qkv[..., :q_size].reshape(shape), qkv[..., q_size:q_size + k_size].reshape(shape)
        else:
            h = layer.input_layernorm(x)
            q, k, v = (packing.spread(proj(h)).view(shape) for proj in (a.q_proj, a.k_proj, a.v_proj))
        if fused is None or not f.qk_together:
            if hasattr(a, "q_norm"):  # qwen3 normalises each head's queries and keys before the rotation
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        kbufs[i][:, :, n:n + tokens] = k
        vbufs[i][:, :, n:n + tokens] = v.transpose(1, 2)
        keys, values = kbufs[i][:, :, :n + tokens], vbufs[i][:, :, :n + tokens]
        # a bf16 twin's pass (serve/bf16_twin.py) attends in the buffers' fp32, and goes on in bf16
        o = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, scale=a.scaling,
                                           enable_gqa=q.shape[1] != keys.shape[1])
        o = packing.pack(o.transpose(1, 2).reshape(rows, tokens, -1).to(x.dtype))
        x = x + (a.o_proj(o) if fused is None else f.o(o))
        if fused is not None:
            gate, up = f.gate_up(f.mlp_norm(x)).split(f.gate_up_sizes, dim=-1)
            x = x + f.down(layer.mlp.act_fn(gate) * up)
        else:
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = packing.wanted(x)
    logits = model.lm_head(inner.norm(x)) if fused is None else fused.head(fused.final_norm(x))
    return packing.logits(logits)


class _Packing:
    """Where a pass's real tokens sit among its [rows, tokens] slots (see `_step`'s `fed` and `want`). With every
    slot real and every logit wanted (a plain step) each method hands its tensor back as it is."""

    __slots__ = ("rows", "tokens", "real", "wanted_slots", "wanted_rows")

    def __init__(self, rows: int, tokens: int, real=None, wanted_slots=None, wanted_rows=None):
        self.rows, self.tokens = rows, tokens
        self.real = real  # flat slot indices of the real tokens (None: all slots)
        self.wanted_slots = wanted_slots  # flat slot indices of the wanted logits (None: all slots)
        self.wanted_rows = wanted_rows  # where those sit among the rows of x (packed or not)

    @classmethod
    def of(cls, fed, want, rows: int, tokens: int) -> "_Packing":
        if tokens == 1:
            return cls(rows, tokens)
        real = None
        if fed is not None and not bool(fed.all()):
            real = fed.reshape(-1).nonzero().squeeze(1)
        wanted_slots = wanted_rows = None
        if want is not None and not bool(want.all()):
            wanted_slots = want.reshape(-1).nonzero().squeeze(1)
            # the row of x holding each wanted slot: its index among the real slots when x is packed
            wanted_rows = wanted_slots if real is None else (fed.reshape(-1).long().cumsum(0) - 1)[wanted_slots]
        return cls(rows, tokens, real, wanted_slots, wanted_rows)

    def pack_ids(self, ids):
        """ids [rows, tokens] -> [1, real tokens] (or as they are)."""
        return ids if self.real is None else ids.reshape(-1)[self.real].unsqueeze(0)

    def pack(self, t):
        """[rows, tokens, d] -> [1, real tokens, d]."""
        return t if self.real is None else t.reshape(self.rows * self.tokens, -1).index_select(0, self.real)[None]

    def spread(self, t):
        """[1, real tokens, d] -> [rows, tokens, d], zeros in the padding slots."""
        if self.real is None:
            return t
        out = t.new_zeros((self.rows * self.tokens, t.shape[-1]))
        out.index_copy_(0, self.real, t[0])
        return out.view(self.rows, self.tokens, -1)

    def wanted(self, x):
        """The hidden states whose logits are wanted: x itself, or [1, wanted, d]."""
        if self.wanted_slots is None:
            return x
        return x.reshape(-1, x.shape[-1]).index_select(0, self.wanted_rows)[None]

    def logits(self, logits):
        """Logits back in [rows, tokens, vocab] (zeros where not wanted)."""
        if self.wanted_slots is None:
            return self.spread(logits)
        out = logits.new_zeros((self.rows * self.tokens, logits.shape[-1]))
        out.index_copy_(0, self.wanted_slots, logits[0])
        return out.view(self.rows, self.tokens, -1)


# The fused copies of a model's projections may take this much memory (beside its weights) at most
FUSE_MAX_BYTES = 64 * 2**20


class Projection:
    """`x @ weight.T + bias`. A bf16 weight on a CPU is also kept prepacked in oneDNN's blocked layout: a plain
    `F.linear` in bf16 reorders its whole weight into that layout on every call, which for the few rows of a
    decode step costs more than the product (on this project's 2-core EPYC, 1 row x 320 -> 1728: 49 us through
    F.linear, 26 us prepacked; the logits' 320 -> 4096: 87 us, 39 us). The packed product is the same oneDNN
    kernel, so its results are bit-identical; `_prepacked` checks that once, and keeps the plain call otherwise."""

    __slots__ = ("weight", "bias", "packed", "_product")

    def __init__(self, weight, bias=None):
        import torch
        import torch.nn.functional as F

        self.weight, self.bias = weight, bias
        self.packed = _prepacked(weight, bias)
        self._product = torch.ops.mkldnn._linear_pointwise if self.packed is not None else F.linear

    def __call__(self, x):
        if self.packed is not None:
            return self._product(x, self.packed, self.bias, "none", [], "")
        return self._product(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight and bias."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed copy (0: none)."""
        return 0 if self.packed is None else self.weight.numel() * self.weight.element_size()


def _prepacked(weight, bias):
    """`weight` in oneDNN's layout for `_linear_pointwise`, when it is bf16 on a CPU and a probe product through
    it equals F.linear's exactly; else None (fp32 goes through MKL, whose rounding differs from oneDNN's)."""
    import torch
    import torch.nn.functional as F

    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            probe = torch.randn((1, 3, weight.shape[1]), generator=torch.Generator().manual_seed(0)).to(weight.dtype)
            same = torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], ""),
                               F.linear(probe, weight, bias))
    except (RuntimeError, AttributeError) as exc:  # a torch built without oneDNN, or without these ops
        log.debug("bf16 weights not prepacked: %s", exc)
        return None
    return packed if same else None


class Norm:
    """An RMS norm module's output through torch's one `rms_norm` op, where transformers' forward makes eight
    (casts, power, mean, add, rsqrt, products): on this project's 2-core CPU 15 us instead of 29 in bf16. Taken
    only when a probe gives the module's bits exactly; the module runs otherwise."""

    __slots__ = ("module", "weight", "eps", "fast")

    def __init__(self, module):
        import torch

        self.module, self.fast = module, False
        self.weight = getattr(module, "weight", None)
        self.eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if self.weight is None or self.weight.dim() != 1 or not isinstance(self.eps, float):
            return
        probe = 3 * torch.randn((2, 3, self.weight.shape[0]), generator=torch.Generator().manual_seed(0))
        probe = probe.to(self.weight.dtype)
        with torch.inference_mode():
            self.fast = torch.equal(self._one_op(probe), module(probe))

    def _one_op(self, x):
        import torch.nn.functional as F

        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

    def __call__(self, x):
        return self._one_op(x) if self.fast else self.module(x)


@dataclass
class FusedLayer:
    attn_norm: Norm
    qkv: Projection
    qkv_sizes: tuple[int, int, int]
    qk_together: bool  # no per-head norm of queries and keys (qwen3's) comes between projection and rotation
    o: Projection
    mlp_norm: Norm
    gate_up: Projection
    gate_up_sizes: tuple[int, int]
    down: Projection


@dataclass
class FusedModel:
    """A model's projections and norms for the lean step: per layer (FusedLayer), and the logits' head."""
    layers: list[FusedLayer]
    final_norm: Norm
    head: Projection

    def __getitem__(self, i: int) -> FusedLayer:
        return self.layers[i]


def projection_modules(model) -> tuple:
    """The modules `fuse_projections` copies, in a fixed order (the decoder makes them again when one changes)."""
    mods = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(mlp, "gate_proj", None),
                 getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)]
    return (*mods, getattr(model, "lm_head", None))


def fuse_projections(model) -> FusedModel | None:
    """For a small model on a CPU: each layer's q/k/v projections as one matrix and its MLP's gate/up as another
    (copies; the model is unchanged), so a pass makes 2 matrix products per layer where it made 5; in bf16 every
    product's weight is prepacked too (`Projection`). On a CPU each product of one row costs mostly its call: on
    this project's 2-core CPU three 320x320 bf16 products of one row took 86 us, one 960x320 product 48 us. None
    when a projection is not a plain linear layer (LoRA adapters wrap them while loaded), the model is not on a
    CPU, or the copies would take more than FUSE_MAX_BYTES."""
    import torch

    def plain(*modules) -> bool:
        return all(type(m) is torch.nn.Linear for m in modules)

    def joined(*modules) -> Projection | None:
        weight = torch.cat([m.weight for m in modules])
        biases = [m.bias for m in modules]
        if all(b is None for b in biases):
            return Projection(weight)
        if any(b is None for b in biases):
            return None
        return Projection(weight, torch.cat(biases))

    layers = model.model.layers
    if not layers or layers[0].self_attn.q_proj.weight.device.type != "cpu" or not plain(*projection_modules(model)):
        return None
    out, total = [], 0
    with torch.no_grad():
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = joined(a.q_proj, a.k_proj, a.v_proj), joined(mlp.gate_proj, mlp.up_proj)
            if qkv is None or gate_up is None:
                return None
            fused = FusedLayer(Norm(layer.input_layernorm), qkv,
                               (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features),
                               not hasattr(a, "q_norm"), Projection(a.o_proj.weight, a.o_proj.bias),
                               Norm(layer.post_attention_layernorm), gate_up,
                               (mlp.gate_proj.out_features, mlp.up_proj.out_features),
                               Projection(mlp.down_proj.weight, mlp.down_proj.bias))
            # the joined matrices are copies; o and down use the model's own weights (a packed layout is a copy)
            total += qkv.nbytes + gate_up.nbytes + sum(p.packed_nbytes for p in (qkv, fused.o, gate_up, fused.down))
            if total > FUSE_MAX_BYTES:
                return None
            out.append(fused)
        head = Projection(model.lm_head.weight, model.lm_head.bias)
        if total + head.packed_nbytes > FUSE_MAX_BYTES:
            return None
    return FusedModel(out, Norm(model.model.norm), head)


class LeanDecoder:
    """The lean step for one loaded model (see the module docstring)."""

    def __init__(self, model, compile: bool = False):
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.compile = compile
        self.compiled = None
        self.compile_seconds: float | None = None
        self.compile_error: str | None = None
        self.steps = {"lean": 0, "compiled": 0}
        self._fusion: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (module ids, fused)

    def fused_for(self, model) -> FusedModel | None:
        """`fuse_projections(model)`, made again when any of its projection modules changes (adapters wrap them)."""
        modules = tuple(id(m) for m in projection_modules(model))
        entry = self._fusion.get(model)
        if entry is None or entry[0] != modules:
            entry = self._fusion[model] = (modules, fuse_projections(model))
        return entry[1]

    @classmethod
    def for_model(cls, model, compile: bool = False) -> "LeanDecoder | None":
        why = _unsupported(model.get_base_model() if hasattr(model, "get_base_model") else model)
        if why is not None:
            log.info("decode step: transformers' forward (%s)", why)
            return None
        return cls(model, compile=compile)

    def forward(self, wrapper, ids, positions, cache, mask2d, padded: bool, twin=None, fed=None, want=None):
        """One pass over `ids` [rows, tokens] continuing `cache` (SlackLayers); `mask2d` [rows, columns] already
        holds the new columns. `wrapper` is the model the engine calls (a PeftModel while adapters are loaded).
        With `twin` (a serve.bf16_twin.Bf16Twin), the pass runs through its bf16 copy. `fed` / `want`: which
        tokens are real and which logits are read (see `_step`)."""
        import torch

        rows, tokens = ids.shape
        n = cache.layers[0].keys.shape[-2]
        kbufs, vbufs = [], []
        for layer in cache.layers:
            kb, vb = layer.reserve(tokens)
            kbufs.append(kb)
            vbufs.append(vb)
        mask = None
        if padded or tokens > 1:
            columns = n + tokens
            # a new token sees the real columns before it and itself
            causal = torch.ones((tokens, columns), dtype=torch.bool, device=ids.device).tril(n)
            real = mask2d[:, -columns:].bool() if padded else torch.ones((rows, columns), dtype=torch.bool,
                                                                          device=ids.device)
            mask = (causal.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)
        plain = wrapper is self.model  # no peft wrapper: no adapter is loaded
        logits = None
        if twin is not None:
            base = twin.base()
            logits = _step(base, ids, positions, kbufs, vbufs, n, mask, self.fused_for(base), fed, want).float()
            twin.counted(rows * tokens)
        elif self.compiled is not None and plain and tokens == 1:
            try:
                logits = self.compiled(self.model, ids, positions, kbufs, vbufs, n, mask)
                self.steps["compiled"] += 1
            except Exception as exc:  # a shape the graphs could not take: the eager step from now on
                log.warning("compiled decode step failed, using the eager one: %s", exc)
                self.compiled = None
                self.compile_error = f"at a step: {type(exc).__name__}: {exc}"[:500]
        if logits is None:  # the same columns are written again: nothing of a failed try remains
            logits = _step(self.model, ids, positions, kbufs, vbufs, n, mask, self.fused_for(self.model), fed, want)
            self.steps["lean"] += 1
        for layer in cache.layers:
            layer.advance(n + tokens)
        return logits

    def warm_up(self) -> None:
        """Compile the one-token step for the shapes the engine uses (one row; several rows with and without
        padding), so the first requests do not wait for it. A failure leaves the eager step in place."""
        if not self.compile:
            return
        import torch

        from refact_lab.serve.batch import cache_kwarg, new_cache

        started = time.monotonic()
        try:
            self.compiled = torch.compile(_step, dynamic=True)
            device = self.model.get_input_embeddings().weight.device
            vocab = self.model.get_input_embeddings().weight.shape[0]
            for rows, padded in ((1, False), (2, False), (3, True)):
                prompt = torch.randint(0, vocab, (rows, 8), device=device)
                cache = new_cache()
                with torch.inference_mode():
                    self.model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): cache})
                    for step in range(2):  # the second call checks the graph is reused, not rebuilt
                        mask2d = torch.ones((rows, 9 + step), dtype=torch.long, device=device)
                        if padded:
                            mask2d[0, :2] = 0
                        ids = torch.randint(0, vocab, (rows, 1), device=device)
                        positions = torch.full((rows, 1), 8 + step, dtype=torch.long, device=device)
                        self.forward(self.model, ids, positions, cache, mask2d, padded)
        except Exception as exc:  # compiling needs a C++ compiler on a CPU, Triton on a GPU: say so, run eager
            log.warning("decode step not compiled: %s", exc)
            self.compiled = None
            self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
        self.compile_seconds = round(time.monotonic() - started, 2)
        self.steps = {"lean": 0, "compiled": 0}

    def stats(self) -> dict[str, Any]:
        return {"path": "compiled" if self.compiled is not None else "lean", "compile": self.compile,
                "compile_seconds": self.compile_seconds, "compile_error": self.compile_error, "steps": dict(self.steps)}
