"""The LoRA trainer: setup -> validate at step 0 -> fit (steps, evaluations, checkpoints) -> save, in one place.

It runs on torch + transformers + peft + accelerate. One code path serves a CPU, one GPU and several processes
started by `accelerate launch` (or torchrun): every process builds the same global batch from the same seed and
takes its own slice of rows, and the loss is normalised by the token count of the *global* batch, so the
gradient after DDP's all-reduce is exactly the single-process gradient (see `_train_step`).

Speed, in order of effect: rows are packed (packing.py: no padding), bf16 autocast where the hardware has it
(GPUs with bf16, CPUs with AMX/AVX512-bf16) with the frozen base weights stored in bf16 so they are not
re-cast every step, SDPA attention with the plain causal kernel, and a fused linear + cross-entropy that
never materialises the [tokens x vocabulary] logits (`LinearCrossEntropy`).

The trainer never touches the UI or the run folder's status: it reports through sinks (callables taking one
record dict: "start", "train", "test", "checkpoint", "info", "end") and asks `should_stop()` at every step
boundary. runs.py turns those records into metrics.jsonl and status.json.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from refact_lab.config import FinetuneSettings, SettingsError
from refact_lab.finetune.checkpoints import TRAINER_STATE, checkpoint_dirs, checkpoint_name, latest_resumable
from refact_lab.finetune.dataset import Dataset
from refact_lab.finetune.schedule import Schedule, fit_to_model, resolve
from refact_lab.models.registry import ModelSpec
from refact_lab.models.registry import resolve as resolve_model

Sink = Callable[[dict], None]
MAX_GRAD_NORM = 1.0
# Rows of logits computed at once in the fused loss. On a GPU this bounds its memory to ~2**26 floats (256 MiB)
# whatever the vocabulary (Qwen's 152k tokens would need 5 GiB of fp32 logits for a 4 x 2048 batch). On a CPU
# the ~8 passes over each chunk (softmax, gradient) are memory-bound, so a chunk that stays in cache (2**21
# floats, 8 MiB) measured 1.5x faster than one big chunk.
LOGIT_BUDGET = {"cuda": 2 ** 26, "cpu": 2 ** 21}
# An evaluation counts as an improvement for early stopping only if the test loss drops by this much (nats).
EARLY_STOP_MIN_DELTA = 1e-3


@dataclass
class FitResult:
    state: str                      # "finished" or "stopped"
    step: int
    total: int
    best: dict | None               # {"step", "test_loss", "checkpoint"}
    last_checkpoint: str | None
    early_stopped: bool = False
    low_gpu_mem_mode: bool = False  # as it ended up (an out-of-memory retry turns it on)
    stop_reason: str | None = None  # why a run ended before its last step (early stop, a stop request)


@dataclass
class Plan:
    """What a run will train on, computed before any model is loaded (the panel's preview uses it too)."""

    schedule: Schedule
    chars_per_token: float
    train_epoch0: object            # packing.PackedRows of epoch 0
    test: object                    # packing.PackedRows
    summary: str


def plan(dataset: Dataset, tokenizer, spec: ModelSpec, settings: FinetuneSettings, processes: int = 1) -> Plan:
    """Tokenize and pack the dataset and derive the schedule ("auto" numbers) from its size (and the processes
    that share each step's global batch)."""
    from refact_lab.finetune import packing

    auto_seq_len = settings.seq_len is None       # kept so the explanation says how the length was chosen
    settings = fit_to_model(settings, spec.n_ctx)   # SettingsError when a set seq_len does not fit the model
    train_files, test_files = dataset.pairs("train"), dataset.pairs("test")
    cpt = packing.chars_per_token(tokenizer, [text for _, text in sorted(train_files)])
    epoch0 = packing.train_rows(train_files, tokenizer, spec.fim, seq_len=settings.seq_len, cpt=cpt,
                                seed=settings.seed, epoch=0, fim_rate=settings.fim_rate,
                                context_rate=settings.context_rate)
    test = packing.test_rows(test_files, tokenizer, spec.fim, seq_len=settings.seq_len, cpt=cpt,
                             fim_rate=settings.fim_rate, max_rows=settings.max_test_rows)
    schedule = resolve(replace(settings, seq_len=None) if auto_seq_len else settings,
                       len(epoch0) * settings.seq_len, spec.n_ctx, processes)
    summary = (f"{len(train_files)} train files -> {epoch0.n_examples:,} examples, {len(epoch0):,} rows of "
               f"{settings.seq_len} tokens ({epoch0.n_tokens:,} tokens); {len(test_files)} test files -> "
               f"{len(test):,} rows ({cpt:.2f} characters per token)")
    return Plan(schedule, cpt, epoch0, test, summary)


# --- the fused loss ------------------------------------------------------------------------------------------

def _linear_cross_entropy_class():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum over tokens of cross_entropy(h @ W.T, target), chunk by chunk.

        The forward pass also computes dLoss/dh (softmax - onehot) @ W for each chunk and keeps only that
        ([tokens x hidden], small), so neither pass ever holds the [tokens x vocab] logits and the backward pass
        recomputes nothing. W (the output head) is frozen under LoRA, so it needs no gradient.
        Targets of -100 are ignored.
        """

        @staticmethod
        def forward(ctx, h, weight, targets, chunk_rows):
            flat_h = h.reshape(-1, h.shape[-1])
            flat_t = targets.reshape(-1)
            w = weight.to(flat_h.dtype)
            grad_h = torch.zeros_like(flat_h) if ctx.needs_input_grad[0] else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, flat_h.shape[0], chunk_rows):
                hc, tc = flat_h[i:i + chunk_rows], flat_t[i:i + chunk_rows]
                valid = tc >= 0
                safe_t = tc.clamp(min=0)
                logits = (hc @ w.t()).float()          # the only [chunk x vocab] tensor, in fp32 for the softmax
                target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                expd = logits.sub_(top).exp_()         # in place: the logits are not needed any more
                denom = expd.sum(dim=-1, keepdim=True)
                total += ((denom.log() + top).squeeze(1) - target_logit).mul(valid).sum()
                if grad_h is not None:
                    # dL/dh = (softmax - onehot) @ W = (exp @ W) / sum - W[target]: normalising and subtracting
                    # after the matmul, on [chunk x hidden] instead of [chunk x vocab], saves two passes over
                    # the big tensor; so does masking ignored rows there.
                    g = (expd.to(w.dtype) @ w).float().div_(denom).sub_(w[safe_t].float())
                    grad_h[i:i + chunk_rows] = g.mul_(valid[:, None]).to(grad_h.dtype)
            ctx.save_for_backward(grad_h if grad_h is not None else flat_h.new_empty(0))
            ctx.h_shape = h.shape
            return total

        @staticmethod
        def backward(ctx, grad_out):
            (grad_h,) = ctx.saved_tensors
            return (grad_h * grad_out).view(ctx.h_shape), None, None, None

    return LinearCrossEntropy


def _make_loss_module(peft_model):
    """A module whose forward returns the summed token loss; DDP wraps this, so its hooks see the backward."""
    import torch

    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    config = base.config
    fused = (hasattr(base, "get_decoder") and isinstance(head, torch.nn.Linear) and head.bias is None
             and not getattr(config, "final_logit_softcapping", None) and not getattr(config, "logit_scale", None)
             and not head.weight.requires_grad)
    lce = _linear_cross_entropy_class()

    class CausalLMLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft_model = peft_model
            self.fused = fused
            self.chunk_rows = None   # decided at the first forward, once the module is on its device

        def forward(self, input_ids, targets):
            if self.fused:
                decoder = self.peft_model.get_base_model().get_decoder()
                hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
                head_weight = self.peft_model.get_base_model().get_output_embeddings().weight
                if self.chunk_rows is None:
                    budget = LOGIT_BUDGET.get(hidden.device.type, LOGIT_BUDGET["cuda"])
                    self.chunk_rows = max(16, budget // head_weight.shape[0])
                return lce.apply(hidden, head_weight, targets, self.chunk_rows)
            # models with a biased, scaled or soft-capped head: the library's own logits
            logits = self.peft_model(input_ids=input_ids, use_cache=False).logits.float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                                                     ignore_index=-100, reduction="sum")

    return CausalLMLoss()


def _targets(tokens, mask):
    """Targets aligned with the inputs: position t predicts token t+1 where the mask allows, else -100."""
    import torch

    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = torch.where(mask[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], -100))
    return targets


# --- the data stream -----------------------------------------------------------------------------------------

class _TrainStream:
    """Global batches of row indices over epochs; each epoch has its own FIM splits and order.

    The position (epoch, offset) is all a checkpoint needs to continue exactly where it left off.
    """

    def __init__(self, build_epoch: Callable[[int], object], epoch0, seed: int, epoch: int = 0, offset: int = 0):
        self.build_epoch, self.seed = build_epoch, seed
        self.epoch, self.offset = epoch, offset
        self._rows = epoch0 if epoch == 0 else build_epoch(epoch)
        self._order = self._permutation()

    def _permutation(self):
        import numpy as np

        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self._rows))

    def next_batch(self, n: int):
        import numpy as np

        tokens, masks = [], []
        while n > 0:
            if self.offset >= len(self._order):
                self.epoch += 1
                self.offset = 0
                self._rows = self.build_epoch(self.epoch)
                self._order = self._permutation()
            take = self._order[self.offset:self.offset + n]
            tokens.append(self._rows.tokens[take])
            masks.append(self._rows.mask[take])
            self.offset += len(take)
            n -= len(take)
        return np.concatenate(tokens), np.concatenate(masks)

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.offset / max(1, len(self._order))

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


# --- checkpoints (names and listing: refact_lab.finetune.checkpoints) ---------------------------------

def _save_checkpoint(out_dir: Path, step: int, peft_model, optimizer, scheduler, trainer_state: dict,
                     settings_record: dict, metrics: dict, adapter_state: dict | None = None) -> Path:
    """Write into a temporary folder and rename, so a kill mid-save never leaves a half checkpoint.
    `adapter_state`: the gathered full state dict under FSDP (the module itself holds only a shard there);
    the optimizer's state is then sharded too and not saved."""
    import torch

    from refact_lab.home import atomic_write_json

    folder = Path(out_dir) / "checkpoints"
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True,
                                   **({"state_dict": adapter_state} if adapter_state is not None else {}))
        atomic_write_json(tmp / "settings.json", settings_record)
        atomic_write_json(tmp / "metrics.json", metrics)
        torch.save({**trainer_state, "optimizer": None if adapter_state is not None else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()},
                   tmp / TRAINER_STATE)
    except BaseException:
        # a full disk is the usual cause: the half-written folder would hold on to the space it took
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Only the latest checkpoint needs optimizer state to resume; older ones keep adapter, settings, metrics.
    for other in checkpoint_dirs(out_dir):
        if other != final:
            with contextlib.suppress(FileNotFoundError):
                (other / TRAINER_STATE).unlink()
    # a save cut short by a kill (-9, out of memory) left its temporary folder; only this process saves, so any
    # other one is such a leftover, holding disk space nothing will ever read
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


# --- the trainer ---------------------------------------------------------------------------------------------

def fit(model: str | ModelSpec, dataset: Dataset, settings: FinetuneSettings, out_dir: Path | None = None, *,
        sinks: Sequence[Sink] = (), should_stop: Callable[[], bool] | None = None,
        log: Callable[[str], None] = print, extra_record: dict | None = None,
        init_adapter: str | Path | None = None) -> FitResult:
    """Train a LoRA adapter on `dataset`. With `out_dir`, checkpoints go to out_dir/checkpoints and a run that
    has one resumes from the latest; otherwise `init_adapter` (an adapter folder with the same LoRA shape, e.g.
    the deployed checkpoint) gives the starting LoRA weights instead of peft's fresh ones. If CUDA runs out of memory with low_gpu_mem_mode off, the run is retried
    once with it on (from its last checkpoint), and the log says so."""
    import torch

    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    oom = None
    try:
        return _fit(spec, dataset, settings, out_dir, sinks, should_stop, log, extra_record or {}, init_adapter)
    except torch.cuda.OutOfMemoryError as e:
        if settings.low_gpu_mem_mode:
            raise
        oom = str(e).splitlines()[0]
    # retried outside the except block so the failed attempt's tensors (held by the traceback) are freed
    gc.collect()
    torch.cuda.empty_cache()
    message = (f"CUDA ran out of memory with low_gpu_mem_mode off ({oom}); retrying with low_gpu_mem_mode on "
               "(gradient checkpointing: slower, much less memory)")
    log(message)
    for sink in sinks:
        sink({"kind": "info", "message": message, "low_gpu_mem_mode": True})
    return _fit(spec, dataset, replace(settings, low_gpu_mem_mode=True), out_dir, sinks, should_stop, log,
                extra_record or {}, init_adapter)


def _use_bf16(precision: str, device) -> bool:
    import torch

    if precision == "fp32":
        return False
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        # bf16 autocast on a CPU without native bf16 (AMX / AVX512-bf16) is emulated and slower than fp32
        ok = torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                                                                   lambda: False)())
    else:
        ok = False
    if precision == "bf16" and not ok:
        raise SettingsError(f"precision: bf16 is not supported on {device}; use auto or fp32")
    return ok


def _fit(spec: ModelSpec, dataset: Dataset, settings: FinetuneSettings, out_dir: Path | None,
         sinks: Sequence[Sink], should_stop, log, extra_record: dict, init_adapter=None) -> FitResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from refact_lab.finetune import packing
    from refact_lab.finetune.lora import add_lora, load_adapter_weights, target_modules, trainable_parameters
    from refact_lab.models.loading import load_model, load_tokenizer

    # ---- setup ------------------------------------------------------------------------------------------
    # Precision is handled here (autocast below), not by Accelerator(mixed_precision=...): accelerate keeps
    # that choice in process-wide state, and a kernel may train several times with different settings.
    accelerator = Accelerator(mixed_precision="no")
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    # FSDP (runs.FSDP_FLAGS, untested here: no GPUs) shards the model in accelerator.prepare
    fsdp = accelerator.distributed_type == "FSDP"
    is_main = accelerator.is_main_process

    def emit(record: dict) -> None:
        if is_main:
            for sink in sinks:
                sink(record)

    def say(message: str) -> None:
        if is_main:
            log(message)

    requested = settings                            # with its auto fields, for the schedule's explanation
    settings = fit_to_model(settings, spec.n_ctx)   # an auto seq_len becomes a number, recorded as used
    if settings.batch_size % world:
        raise SettingsError(f"batch_size: {settings.batch_size} does not divide evenly over {world} processes")
    per_process = settings.batch_size // world
    micro = min(settings.micro_batch_size or per_process, per_process)
    if per_process % micro:
        raise SettingsError(f"micro_batch_size: {micro} does not divide the {per_process} rows per process")
    bf16 = _use_bf16(settings.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    tokenizer = load_tokenizer(spec)
    the_plan = plan(dataset, tokenizer, spec, requested, processes=world)
    schedule = the_plan.schedule
    if len(the_plan.test) == 0:
        raise ValueError("the test set is empty after formatting: no test loss can be measured")

    def build_epoch(epoch: int):
        return packing.train_rows(dataset.pairs("train"), tokenizer, spec.fim, seq_len=settings.seq_len,
                                  cpt=the_plan.chars_per_token, seed=settings.seed, epoch=epoch,
                                  fim_rate=settings.fim_rate, context_rate=settings.context_rate)

    set_seed(settings.seed)
    # under FSDP the full model is loaded on the CPU and only its shards reach the GPU, in prepare()
    model = load_model(spec, device="cpu" if fsdp else str(device), dtype="bfloat16" if bf16 else "float32")
    model.config.use_cache = False
    if settings.low_gpu_mem_mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = target_modules(model, spec.lora_targets)
    peft_model = add_lora(model, settings, targets)
    if bf16:
        # peft casts each LoRA input to the adapter's fp32 and autocast casts it back to bf16 for the matmul:
        # two copies of the activations per adapted layer for nothing. Autocast alone handles the dtypes.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in peft_model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    peft_model.train()
    trainable, total_params = trainable_parameters(peft_model)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95), **({"fused": True} if device.type == "cuda" else {}))
    # The scheduler is stepped once per optimizer step by us, not prepared by accelerate (which would step it
    # once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.lr_factor(s))

    # ---- resume -----------------------------------------------------------------------------------------
    step, stream_state, best, evals_since_best, tokens_seen = 0, {"epoch": 0, "offset": 0}, None, 0, 0
    resume_from = latest_resumable(out_dir) if out_dir else None
    if init_adapter and resume_from is None:
        # continue an adapter (update-and-retrain): its weights, fresh optimizer and schedule
        load_adapter_weights(peft_model, init_adapter)
        extra_record = {**extra_record, "init_adapter": str(init_adapter)}
    if resume_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=False)
            weights = load_file(str(resume_from / "adapter_model.safetensors"))
        except Exception as e:  # noqa: BLE001 - torch and safetensors raise their own types for a damaged file
            # a checkpoint is written whole, so this is damage from outside; torch's message names no file
            why = (str(e).splitlines() or [""])[0][:120]
            raise ValueError(f"checkpoint {resume_from.name} cannot be resumed, its files are damaged "
                             f"({type(e).__name__}: {why}); move {resume_from} out of the run folder and resume "
                             "again (only the latest checkpoint keeps the optimizer state, so the run then starts "
                             "again from step 0)") from e
        set_peft_model_state_dict(peft_model, weights)
        # the saved schedule wins: the dataset may have been re-scanned since, the run continues as it began
        # (fields an older version did not save come from today's resolution)
        schedule = Schedule(**{**schedule.to_dict(), **state["schedule"]})
        step, stream_state = state["step"], state["stream"]
        best, evals_since_best, tokens_seen = state.get("best"), state.get("evals_since_best", 0), state.get(
            "tokens_seen", 0)
        set_seed(settings.seed + step)

    loss_module = _make_loss_module(peft_model)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if resume_from is not None:
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            say("resumed without optimizer state (an FSDP checkpoint): AdamW's moments start afresh")
        scheduler.load_state_dict(state["scheduler"])
    plain_module = accelerator.unwrap_model(loss_module)

    stream = _TrainStream(build_epoch, the_plan.train_epoch0, settings.seed, **stream_state)
    test_tokens = torch.from_numpy(the_plan.test.tokens).long()
    test_targets = _targets(test_tokens, torch.from_numpy(the_plan.test.mask))
    n_test_targets = int((test_targets >= 0).sum())

    settings_record = {"finetune": asdict(settings), "model": spec.name, "model_source": spec.source,
                       "fim": asdict(spec.fim), "lora_targets": list(targets), "schedule": schedule.to_dict(),
                       "dataset": {"project": dataset.project, "train_files": len(dataset.train),
                                   "test_files": len(dataset.test)}, **extra_record}

    say(f"model {spec.name} ({spec.source}) on {device} x{world}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, SDPA attention, "
        f"{'fused' if plain_module.fused else 'plain'} cross-entropy"
        + (", gradient checkpointing (low_gpu_mem_mode)" if settings.low_gpu_mem_mode else ""))
    say(f"LoRA r={settings.lora_r} alpha={settings.lora_alpha:g} on {', '.join(targets)}: "
        f"{trainable:,} trainable of {total_params:,} parameters")
    say(f"data: {the_plan.summary}")
    for note in dataset.notes:
        say(f"data: {note}")
    if dataset.skipped:
        say(f"data: skipped {len(dataset.skipped)} files: " + "; ".join(dataset.skipped[:5])
            + (" ..." if len(dataset.skipped) > 5 else ""))
    say(f"schedule: {schedule.explanation}")
    if init_adapter and resume_from is None:
        say(f"LoRA weights initialised from adapter {init_adapter}")
    if resume_from is not None:
        say(f"resumed from {resume_from.name} (step {step}, epoch {stream.epoch_progress:.2f})")
    emit({"kind": "start", "step": step, "total": schedule.train_steps, "resumed_from": step if resume_from else None,
          "schedule": schedule.to_dict(), "plan": the_plan.summary, "world_size": world, "bf16": bf16,
          "low_gpu_mem_mode": settings.low_gpu_mem_mode})

    # ---- validate -----------------------------------------------------------------------------------------
    def evaluate() -> float:
        plain_module.eval()
        total = torch.zeros((), dtype=torch.float32, device=device)
        # each process takes every world-th row; the unwrapped module avoids DDP (uneven counts are fine)
        mine = list(range(rank, len(test_tokens), world))
        with torch.no_grad(), autocast():
            for i in range(0, len(mine), micro):
                idx = mine[i:i + micro]
                total += plain_module(test_tokens[idx].to(device), test_targets[idx].to(device))
        plain_module.train()
        return float(accelerator.reduce(total, "sum")) / max(1, n_test_targets)

    def save(at_step: int, test_loss: float | None, train_loss: float | None) -> Path | None:
        if out_dir is None:
            return None
        nonlocal best
        is_best = test_loss is not None and (best is None or test_loss < best["test_loss"])
        if is_best:
            best = {"step": at_step, "test_loss": test_loss, "checkpoint": checkpoint_name(at_step)}
        path = None
        # under FSDP every process holds a shard: gathering the full state dict is a collective (every process
        # takes part), then process 0 writes the adapter from it
        adapter_state = None
        if fsdp:
            full = accelerator.get_state_dict(loss_module)
            adapter_state = {k.removeprefix("peft_model."): v for k, v in full.items()} if is_main else None
        if is_main:
            path = _save_checkpoint(
                out_dir, at_step, accelerator.unwrap_model(loss_module).peft_model, optimizer, scheduler,
                {"step": at_step, "stream": stream.state(), "best": best, "evals_since_best": evals_since_best,
                 "tokens_seen": tokens_seen, "schedule": schedule.to_dict()},
                settings_record,
                {"step": at_step, "test_loss": test_loss, "train_loss": train_loss, "tokens_seen": tokens_seen,
                 "time": time.time()}, adapter_state)
            emit({"kind": "checkpoint", "step": at_step, "checkpoint": path.name, "test_loss": test_loss,
                  "best": best})
        accelerator.wait_for_everyone()
        return path

    eval_seconds = 0.0
    if step == 0:
        t0 = time.perf_counter()
        first = evaluate()
        eval_seconds = time.perf_counter() - t0
        emit({"kind": "test", "step": 0, "test_loss": first, "eval_s": eval_seconds})
        say(f"step 0: test loss {first:.4f} (before training)")
        # the untrained model is the bar every checkpoint must beat for early stopping's purposes
        reference = first
    else:
        reference = best["test_loss"] if best else math.inf

    # ---- fit ----------------------------------------------------------------------------------------------
    state_name, early_stopped, last_ckpt, stop_reason = "finished", False, None, None
    recent: list[float] = []
    train_losses: list[float] = []
    while step < schedule.train_steps:
        t0 = time.perf_counter()
        tokens, mask = stream.next_batch(settings.batch_size)
        tokens = torch.from_numpy(tokens).long()
        targets_all = _targets(tokens, torch.from_numpy(mask))
        global_targets = int((targets_all >= 0).sum())
        mine_tokens, mine_targets = tokens[rank::world], targets_all[rank::world]
        n_micro = len(mine_tokens) // micro
        local_sum = torch.zeros((), dtype=torch.float32, device=device)
        for j in range(n_micro):
            ids = mine_tokens[j * micro:(j + 1) * micro].to(device, non_blocking=True)
            tgt = mine_targets[j * micro:(j + 1) * micro].to(device, non_blocking=True)
            sync = accelerator.no_sync(loss_module) if j < n_micro - 1 else contextlib.nullcontext()
            with sync:
                with autocast():
                    loss_sum = loss_module(ids, tgt)
                # DDP averages gradients over processes; multiplying by `world` and dividing by the tokens of
                # the global batch makes the result the per-token mean over the whole batch, exactly what one
                # process computing the same batch would get (rows differ in target count, so a per-process
                # mean would weight them wrongly).
                accelerator.backward(loss_sum * (world / max(1, global_targets)))
            local_sum += loss_sum.detach()
        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = float(accelerator.reduce(local_sum, "sum")) / max(1, global_targets)
        step += 1
        tokens_seen += int(tokens.numel())
        dt = time.perf_counter() - t0
        recent = (recent + [dt])[-20:]
        train_losses = (train_losses + [train_loss])[-schedule.eval_every:]
        remaining = schedule.train_steps - step
        evals_left = remaining // schedule.eval_every
        eta = remaining * (sum(recent) / len(recent)) + evals_left * eval_seconds
        emit({"kind": "train", "step": step, "total": schedule.train_steps, "loss": train_loss, "lr": lr,
              "tokens_per_s": tokens.numel() / dt, "step_s": dt, "epoch": round(stream.epoch_progress, 4),
              "eta_s": eta, "tokens_seen": tokens_seen})

        stop_now = bool(should_stop()) if (should_stop and is_main) else False
        if world > 1:  # every process must leave the loop at the same step, or the next all-reduce hangs
            flag = torch.tensor(float(stop_now), device=device)
            stop_now = float(accelerator.reduce(flag, "sum")) > 0
        last = step >= schedule.train_steps
        due_eval = step % schedule.eval_every == 0 or step % schedule.checkpoint_every == 0 or last or stop_now
        if not due_eval:
            continue
        t_eval = time.perf_counter()
        test_loss = evaluate()
        eval_seconds = time.perf_counter() - t_eval
        emit({"kind": "test", "step": step, "test_loss": test_loss, "eval_s": eval_seconds})
        lowest = min(reference, best["test_loss"] if best else math.inf)
        improved = test_loss < lowest
        # patience only resets on a real improvement: noise-level gains must not keep a finished run going
        evals_since_best = 0 if test_loss < lowest - EARLY_STOP_MIN_DELTA else evals_since_best + 1
        mean_train = sum(train_losses) / len(train_losses)
        say(f"step {step}/{schedule.train_steps}: train loss {mean_train:.4f}, test loss {test_loss:.4f}"
            + (" (best so far)" if improved else "")
            + (f" ({evals_since_best} evaluations without improvement)" if evals_since_best else ""))
        patience_out = settings.early_stop_patience and evals_since_best >= settings.early_stop_patience
        if improved or last or stop_now or patience_out or step % schedule.checkpoint_every == 0:
            last_ckpt = save(step, test_loss, mean_train)
        if stop_now:
            state_name = "stopped"
            stop_reason = f"stopped by request at step {step} of {schedule.train_steps}"
            say(f"stopped at step {step} on request; checkpoint {checkpoint_name(step)} written")
            break
        if patience_out:
            early_stopped = True
            stop_reason = (f"stopped early at step {step} of {schedule.train_steps}: no lower test loss in "
                           f"{evals_since_best} evaluations (early_stop_patience {settings.early_stop_patience})")
            say(f"early stop at step {step}: no lower test loss in {evals_since_best} evaluations")
            break

    result = FitResult(state_name, step, schedule.train_steps, best,
                       last_ckpt.name if last_ckpt else None, early_stopped, settings.low_gpu_mem_mode,
                       stop_reason)
    emit({"kind": "end", **asdict(result)})
    return result


def iter_records(records: Iterable[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("kind") == kind]
