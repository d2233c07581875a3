"""FinetuneSettings (validation, metadata for the form and the CLI) and the "auto" schedule."""

import dataclasses
import math

import pytest

from refact_lab.config import FinetuneSettings, SettingsError, field_specs, with_overrides
from refact_lab.finetune.schedule import AUTO_EVALUATIONS, MIN_LR_RATIO, fit_to_model, resolve

ISSUE_FIELDS = ["lora_r", "lora_alpha", "lora_init_scale", "lora_dropout", "learning_rate", "batch_size",
                "warmup_steps", "weight_decay", "train_steps", "lr_decay_steps", "low_gpu_mem_mode", "seq_len",
                "eval_every", "checkpoint_every", "early_stop_patience", "seed"]


def test_every_field_has_help_and_numbers_have_bounds():
    specs = {s["name"]: s for s in field_specs(FinetuneSettings)}
    assert set(ISSUE_FIELDS) <= set(specs)
    for spec in specs.values():
        assert len(spec["help"]) > 15, spec["name"]
        if spec["type"] in (int, float):
            assert spec["min"] is not None and spec["max"] is not None, spec["name"]
    # "auto" by default: derived from the dataset size
    for name in ("train_steps", "lr_decay_steps", "warmup_steps", "seq_len", "eval_every", "checkpoint_every"):
        assert specs[name]["auto"] and specs[name]["default"] is None


def test_overrides_parse_and_auto_reads_as_none():
    s = with_overrides(FinetuneSettings(), ["lora_r=8", "learning_rate=1e-4", "low_gpu_mem_mode=yes",
                                            "train_steps=500", "train_steps=auto", "lora_alpha=16"])
    assert (s.lora_r, s.learning_rate, s.low_gpu_mem_mode, s.train_steps, s.lora_alpha) == (8, 1e-4, True, None, 16.0)
    assert isinstance(s.lora_alpha, float)


@pytest.mark.parametrize("pairs, message", [
    (["lora_r=0"], "lora_r: 0 is below the minimum 1"),
    (["lora_dropout=0.95"], "lora_dropout: 0.95 is above the maximum 0.9"),
    (["batch_size=many"], "batch_size: cannot read 'many'"),
    (["seq_len=100.5"], "seq_len: expected a whole number"),
    (["precision=fp8"], "precision: 'fp8' is not one of auto, bf16, fp32"),
    (["lora_rank=4"], "unknown setting 'lora_rank'"),
    (["train_steps=10", "warmup_steps=10"], "warmup_steps: 10 must be smaller than train_steps 10"),
    (["batch_size=8", "micro_batch_size=3"], "batch_size: 8 is not a multiple of micro_batch_size 3"),
    (["batch_size=2", "micro_batch_size=4"], "micro_batch_size: 4 is larger than batch_size 2"),
    (["low_gpu_mem_mode=maybe"], "low_gpu_mem_mode: cannot read 'maybe'"),
])
def test_invalid_values_give_a_clear_message(pairs, message):
    with pytest.raises(SettingsError) as err:
        with_overrides(FinetuneSettings(), pairs)
    assert message in str(err.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(SettingsError, match="learning_rate: 5.0 is above the maximum"):
        FinetuneSettings(learning_rate=5.0)
    with pytest.raises(SettingsError, match="lora_r: expected a number"):
        FinetuneSettings(lora_r="16")


def test_auto_schedule_is_derived_from_the_dataset_size_and_explained():
    s = FinetuneSettings(batch_size=4, seq_len=1000, epochs=2)
    sched = resolve(s, train_tokens=100_000)
    assert sched.steps_per_epoch == 25                       # 100k tokens / 4k tokens per step
    assert sched.train_steps == 50                           # x 2 epochs
    assert sched.lr_decay_steps == 50
    assert sched.warmup_steps == 2                           # 5% of 50, rounded
    assert "100,000 tokens" in sched.explanation and "25 steps per epoch" in sched.explanation
    bigger = resolve(s, train_tokens=1_000_000)
    assert bigger.train_steps == 500 and bigger.warmup_steps == 25
    huge = resolve(s, train_tokens=10**10)
    assert huge.warmup_steps == 100                          # capped
    tiny = resolve(s, train_tokens=3000)
    assert tiny.train_steps == 10 and "minimum 10" in tiny.explanation


def test_explicit_numbers_win_over_auto():
    s = FinetuneSettings(batch_size=4, seq_len=1000, train_steps=70, lr_decay_steps=200, warmup_steps=7)
    sched = resolve(s, train_tokens=100_000)
    assert (sched.train_steps, sched.lr_decay_steps, sched.warmup_steps) == (70, 200, 7)
    with pytest.raises(SettingsError, match="training set is empty"):
        resolve(s, 0)
    with pytest.raises(SettingsError, match="warmup_steps: 20 must be smaller than the 10 train steps"):
        resolve(dataclasses.replace(s, train_steps=None, warmup_steps=20), train_tokens=3000)


def test_learning_rate_warms_up_then_decays_by_cosine_to_the_floor():
    sched = resolve(FinetuneSettings(batch_size=1, seq_len=100, train_steps=100, warmup_steps=10), 10_000)
    f = [sched.lr_factor(i) for i in range(120)]
    assert all(a < b for a, b in zip(f[:10], f[1:11]))       # rising during warmup
    assert math.isclose(f[10], 1.0)                          # peak right after warmup
    assert all(a >= b for a, b in zip(f[10:100], f[11:101]))  # then never rising
    assert math.isclose(f[55], MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5, rel_tol=1e-9)   # halfway
    assert math.isclose(f[100], MIN_LR_RATIO) and math.isclose(f[119], MIN_LR_RATIO)


def test_auto_seq_len_fits_the_model():
    """The defaults must fit the embedded default model (512 tokens of context) and use 1024 where it fits."""
    assert fit_to_model(FinetuneSettings(), 512).seq_len == 512
    assert fit_to_model(FinetuneSettings(), 32768).seq_len == 1024
    assert fit_to_model(FinetuneSettings(seq_len=256), 512).seq_len == 256
    with pytest.raises(SettingsError, match=r"seq_len: 1024 is longer than the model's context \(512 tokens\)"):
        fit_to_model(FinetuneSettings(seq_len=1024), 512)
    sched = resolve(FinetuneSettings(batch_size=4), train_tokens=100_000, n_ctx=512)
    assert sched.seq_len == 512 and sched.tokens_per_step == 2048
    assert "seq_len auto = the smaller of 1024 and the model's context (512) = 512" in sched.explanation
    with pytest.raises(SettingsError, match="seq_len: auto needs the model's context"):
        resolve(FinetuneSettings(), train_tokens=100_000)


@pytest.mark.parametrize("train_steps", [10, 58, 200, 1000, 50_000])
def test_auto_eval_every_gives_about_20_evaluations_whatever_the_run_length(train_steps):
    sched = resolve(FinetuneSettings(batch_size=4, seq_len=100, train_steps=train_steps), train_tokens=10_000)
    evaluations = train_steps // sched.eval_every
    assert 15 <= evaluations <= 25 or (train_steps < AUTO_EVALUATIONS and sched.eval_every == 1)
    assert f"eval_every auto = {train_steps:,} steps / {AUTO_EVALUATIONS} evaluations" in sched.explanation
    # periodic checkpoints fall on evaluations (a checkpoint holds its test loss), about 10 over the run
    assert sched.checkpoint_every == 2 * sched.eval_every and "checkpoint_every auto" in sched.explanation


def test_the_58_step_run_of_the_issue_draws_its_curve_from_about_20_points():
    sched = resolve(FinetuneSettings(batch_size=8, seq_len=512, train_steps=58), train_tokens=200_000)
    assert sched.eval_every == 3 and 58 // sched.eval_every == 19
    set_ = resolve(FinetuneSettings(batch_size=8, seq_len=512, train_steps=58, eval_every=50,
                                    checkpoint_every=7), train_tokens=200_000)
    assert (set_.eval_every, set_.checkpoint_every) == (50, 7)        # numbers set by hand win
