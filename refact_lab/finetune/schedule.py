"""The training schedule: "auto" sequence length, train steps, warmup, decay, evaluation and checkpoint
intervals derived from the model and the dataset size, and the LR curve.

`fit_to_model(settings, n_ctx)` settles the sequence length first (it decides how the data is packed, so it
must be known before the dataset is tokenized) and refuses one longer than the model's context; then
`resolve(settings, train_tokens, n_ctx)` turns the settings (where train_steps, lr_decay_steps, warmup_steps,
eval_every and checkpoint_every may be None, meaning auto) into concrete numbers plus a one-line explanation
of how they were derived, which the panel shows before a run starts and the run's log repeats. The same
functions serve the run's creation (which refuses what cannot fit), the preview and the trainer, so the
numbers shown are the numbers used.

Learning rate: linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to MIN_LR_RATIO of the
peak at step `lr_decay_steps` (counted from the start of the run), then flat.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from refact_lab.config import FinetuneSettings, SettingsError

MIN_LR_RATIO = 0.1
AUTO_MIN_STEPS = 10        # fewer optimizer steps than this cannot show a learning curve
AUTO_MAX_STEPS = 50_000
AUTO_WARMUP_SHARE = 0.05
AUTO_WARMUP_MAX = 100
# Packed rows of 1024 tokens hold a whole typical source file with room for FIM context, and keep a batch of 8
# within a small GPU or a CPU; a model with a shorter context gets its whole context.
AUTO_SEQ_LEN = 1024
# About 20 points on the test-loss curve whatever the run's length: enough to see it bend and to pick the best
# checkpoint, few enough that evaluation (max_test_rows forward passes, each about a third of a training row's
# cost) stays a modest share of the run.
AUTO_EVALUATIONS = 20
# A periodic checkpoint at every second evaluation: about 10 over a run, so a killed run loses at most a tenth
# of its steps, while improvements (the checkpoints that matter for "best") are saved at every evaluation anyway.
AUTO_EVALS_PER_CHECKPOINT = 2


@dataclass(frozen=True)
class Schedule:
    train_steps: int
    lr_decay_steps: int
    warmup_steps: int
    steps_per_epoch: int
    train_tokens: int
    tokens_per_step: int
    explanation: str
    # defaults only so a schedule saved by an older version (without them) still loads; resolve sets them
    seq_len: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = self.lr_decay_steps - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)


def seq_len_for(settings: FinetuneSettings, n_ctx: int) -> tuple[int, str]:
    """The sequence length a run uses with a model of `n_ctx` tokens of context, and how it was chosen.
    Raises SettingsError when a set length does not fit the model."""
    if settings.seq_len is None:
        seq_len = min(AUTO_SEQ_LEN, n_ctx)
        return seq_len, f"seq_len auto = the smaller of {AUTO_SEQ_LEN} and the model's context ({n_ctx}) = {seq_len}"
    if settings.seq_len > n_ctx:
        raise SettingsError(f"seq_len: {settings.seq_len} is longer than the model's context ({n_ctx} tokens); "
                            f"use at most {n_ctx} or auto")
    return settings.seq_len, f"seq_len {settings.seq_len} (set)"


def fit_to_model(settings: FinetuneSettings, n_ctx: int) -> FinetuneSettings:
    """The settings with the sequence length settled for this model (SettingsError when it cannot fit)."""
    return replace(settings, seq_len=seq_len_for(settings, n_ctx)[0])


def resolve(settings: FinetuneSettings, train_tokens: int, n_ctx: int | None = None, processes: int = 1) -> Schedule:
    """Concrete schedule for a dataset of `train_tokens` tokens (one epoch of packed training rows).
    An auto seq_len needs the model's context `n_ctx`. `batch_size` is the global batch whatever the number of
    `processes`, so the steps are the same; each process trains its share of every step's rows."""
    if settings.seq_len is None and n_ctx is None:
        raise SettingsError("seq_len: auto needs the model's context length")
    if train_tokens <= 0:
        raise SettingsError("the training set is empty: nothing to train on")
    if n_ctx is not None:
        seq_len, seq_note = seq_len_for(settings, n_ctx)
    else:
        seq_len, seq_note = settings.seq_len, f"seq_len {settings.seq_len} (set)"
    tokens_per_step = settings.batch_size * seq_len
    steps_per_epoch = max(1, math.ceil(train_tokens / tokens_per_step))
    parts = [seq_note]
    if processes > 1:
        if settings.batch_size % processes:
            raise SettingsError(f"batch_size: {settings.batch_size} (the global batch) does not divide evenly over "
                                f"{processes} processes")
        parts.append(f"batch_size {settings.batch_size} is the global batch: {processes} processes x "
                     f"{settings.batch_size // processes} rows per step")
    if settings.train_steps is None:
        raw = math.ceil(settings.epochs * steps_per_epoch)
        train_steps = min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, raw))
        clamp = ""
        if raw != train_steps:
            clamp = f", raised to the minimum {AUTO_MIN_STEPS}" if raw < train_steps else \
                f", capped at {AUTO_MAX_STEPS}"
        parts.append(
            f"train_steps auto = {train_tokens:,} tokens / ({settings.batch_size} x {seq_len} tokens per "
            f"step) = {steps_per_epoch:,} steps per epoch x {settings.epochs:g} epochs = {raw:,}{clamp}"
            + (f" -> {train_steps:,}" if clamp else ""))
    else:
        train_steps = settings.train_steps
        parts.append(f"train_steps {train_steps:,} (set; {train_steps / steps_per_epoch:.2g} epochs of "
                     f"{steps_per_epoch:,} steps)")
    if settings.warmup_steps is None:
        warmup = min(AUTO_WARMUP_MAX, round(AUTO_WARMUP_SHARE * train_steps), train_steps - 1)
        parts.append(f"warmup auto = {warmup:,} steps (5%, at most {AUTO_WARMUP_MAX})")
    else:
        warmup = settings.warmup_steps
        if warmup >= train_steps:
            raise SettingsError(f"warmup_steps: {warmup} must be smaller than the {train_steps} train steps")
        parts.append(f"warmup {warmup:,} steps")
    if settings.lr_decay_steps is None:
        decay = train_steps
        parts.append(f"lr_decay_steps auto = train_steps = {decay:,}")
    else:
        decay = settings.lr_decay_steps
        parts.append(f"lr_decay_steps {decay:,}")
    if settings.eval_every is None:
        eval_every = max(1, round(train_steps / AUTO_EVALUATIONS))
        parts.append(f"eval_every auto = {train_steps:,} steps / {AUTO_EVALUATIONS} evaluations = {eval_every:,} "
                     f"({train_steps // eval_every} evaluations after step 0)")
    else:
        eval_every = settings.eval_every
        parts.append(f"eval_every {eval_every:,} steps ({train_steps // eval_every} evaluations after step 0)")
    if settings.checkpoint_every is None:
        checkpoint_every = eval_every * AUTO_EVALS_PER_CHECKPOINT
        parts.append(f"checkpoint_every auto = {AUTO_EVALS_PER_CHECKPOINT} x eval_every = {checkpoint_every:,} "
                     "(and whenever the test loss improves)")
    else:
        checkpoint_every = settings.checkpoint_every
        parts.append(f"checkpoint_every {checkpoint_every:,} steps")
    return Schedule(train_steps=train_steps, lr_decay_steps=decay, warmup_steps=warmup,
                    steps_per_epoch=steps_per_epoch, train_tokens=train_tokens, tokens_per_step=tokens_per_step,
                    explanation="; ".join(parts), seq_len=seq_len, eval_every=eval_every,
                    checkpoint_every=checkpoint_every)
