"""The training schedule: "auto" train steps, warmup and decay derived from the dataset size, and the LR curve.

`resolve(settings, train_tokens)` turns the settings (where train_steps, lr_decay_steps and warmup_steps may
be None, meaning auto) into concrete numbers plus a one-line explanation of how they were derived, which the
panel shows before a run starts and the run's log repeats. The same function serves the preview and the
trainer, so the numbers shown are the numbers used.

Learning rate: linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to MIN_LR_RATIO of the
peak at step `lr_decay_steps` (counted from the start of the run), then flat.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from refact_lab.config import FinetuneSettings, SettingsError

MIN_LR_RATIO = 0.1
AUTO_MIN_STEPS = 10        # fewer optimizer steps than this cannot show a learning curve
AUTO_MAX_STEPS = 50_000
AUTO_WARMUP_SHARE = 0.05
AUTO_WARMUP_MAX = 100


@dataclass(frozen=True)
class Schedule:
    train_steps: int
    lr_decay_steps: int
    warmup_steps: int
    steps_per_epoch: int
    train_tokens: int
    tokens_per_step: int
    explanation: str

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = self.lr_decay_steps - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(settings: FinetuneSettings, train_tokens: int) -> Schedule:
    """Concrete schedule for a dataset of `train_tokens` tokens (one epoch of packed training rows)."""
    if train_tokens <= 0:
        raise SettingsError("the training set is empty: nothing to train on")
    tokens_per_step = settings.batch_size * settings.seq_len
    steps_per_epoch = max(1, math.ceil(train_tokens / tokens_per_step))
    parts = []
    if settings.train_steps is None:
        raw = math.ceil(settings.epochs * steps_per_epoch)
        train_steps = min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, raw))
        clamp = ""
        if raw != train_steps:
            clamp = f", raised to the minimum {AUTO_MIN_STEPS}" if raw < train_steps else \
                f", capped at {AUTO_MAX_STEPS}"
        parts.append(
            f"train_steps auto = {train_tokens:,} tokens / ({settings.batch_size} x {settings.seq_len} tokens per "
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
    return Schedule(train_steps=train_steps, lr_decay_steps=decay, warmup_steps=warmup,
                    steps_per_epoch=steps_per_epoch, train_tokens=train_tokens, tokens_per_step=tokens_per_step,
                    explanation="; ".join(parts))
