"""The trainer: its loss is the true cross-entropy, it learns, it stops early, and 2 processes = 1 process."""

import json

import pytest
import torch

from refact_lab.finetune.dataset import load_dataset
from refact_lab.finetune.trainer import EARLY_STOP_MIN_DELTA, _linear_cross_entropy_class, fit
from tests.finetune.conftest import quick_settings


def test_fused_linear_cross_entropy_matches_autograd_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = -100
    targets[2, -1] = -100
    ref = torch.nn.functional.cross_entropy((h @ weight.T).view(-1, 50), targets.view(-1), ignore_index=-100,
                                            reduction="sum")
    ref.backward()
    ref_grad = h.grad.clone()
    h.grad = None
    fused = _linear_cross_entropy_class().apply(h, weight, targets, 7)   # chunks of 7 rows: 5 chunks
    (fused * 0.5).backward()
    assert torch.allclose(fused.double(), ref, rtol=1e-5)
    assert torch.allclose(h.grad, 0.5 * ref_grad, rtol=1e-4, atol=1e-5)   # logits are fp32 inside


@pytest.mark.slow
def test_it_learns_the_repository(home, stdlib_project, learnable_model_dir, tmp_path):
    """A tiny model fine-tuned for a short CPU run on real stdlib code: the best checkpoint's test loss is
    clearly below the loss before training."""
    records = []
    settings = quick_settings(train_steps=24, learning_rate=3e-2, eval_every=8, checkpoint_every=12, seed=3)
    result = fit(str(learnable_model_dir), load_dataset(home, stdlib_project), settings, tmp_path / "run",
                 sinks=[records.append], log=lambda m: None)
    tests = [r for r in records if r["kind"] == "test"]
    trains = [r for r in records if r["kind"] == "train"]
    assert tests[0]["step"] == 0 and records[0]["kind"] == "start"   # measured before the first step
    step0 = tests[0]["test_loss"]
    assert result.state == "finished" and result.step == 24
    # from ~6.5 (about uniform over the 512-token vocabulary) to ~5.95 here; 0.3 nats is far beyond noise
    assert result.best["test_loss"] < step0 - 0.3, (step0, result.best)
    assert [r["step"] for r in trains] == list(range(1, 25))
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 and r["loss"] > 0 for r in trains)
    # every checkpoint holds the adapter with the settings and metrics that made it
    ckpt = tmp_path / "run" / "checkpoints" / result.best["checkpoint"]
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    saved = json.loads((ckpt / "settings.json").read_text())
    assert saved["finetune"]["train_steps"] == 24 and saved["fim"]["prefix"] == "<|fim_prefix|>"
    assert json.loads((ckpt / "metrics.json").read_text())["test_loss"] == result.best["test_loss"]
    # "best" is the lowest test loss among the checkpoints
    losses = {r["checkpoint"]: r["test_loss"] for r in records if r["kind"] == "checkpoint"}
    assert result.best["checkpoint"] == min(losses, key=losses.get)
    # the adapter really changes the model's predictions
    from peft import PeftModel

    from refact_lab.models.loading import load_model

    base = load_model(str(learnable_model_dir))
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(ckpt))(input_ids=ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_early_stop_after_evaluations_without_improvement(home, stdlib_project, learnable_model_dir, tmp_path):
    # at the smallest learning rate the test loss moves by far less than EARLY_STOP_MIN_DELTA per evaluation
    settings = quick_settings(train_steps=40, learning_rate=1e-7, eval_every=2, checkpoint_every=100,
                              early_stop_patience=2)
    records = []
    result = fit(str(learnable_model_dir), load_dataset(home, stdlib_project), settings, tmp_path / "run",
                 sinks=[records.append], log=lambda m: None)
    tests = [r["test_loss"] for r in records if r["kind"] == "test"]
    assert result.early_stopped and result.state == "finished"
    assert result.stop_reason == ("stopped early at step 4 of 40: no lower test loss in 2 evaluations "
                                  "(early_stop_patience 2)")
    assert result.step == 4 and len(tests) == 3                # step 0, then 2 evaluations without improvement
    assert max(abs(t - tests[0]) for t in tests) < EARLY_STOP_MIN_DELTA
    assert result.last_checkpoint == "step-000004"             # the run can still be deployed or inspected


@pytest.mark.slow
def test_auto_eval_every_measures_the_test_loss_about_20_times(home, stdlib_project, learnable_model_dir, tmp_path):
    settings = quick_settings(train_steps=40, eval_every=None, checkpoint_every=None)
    records = []
    result = fit(str(learnable_model_dir), load_dataset(home, stdlib_project), settings, tmp_path / "run",
                 sinks=[records.append], log=lambda m: None)
    assert result.step == 40 and result.stop_reason is None
    assert [r["step"] for r in records if r["kind"] == "test"] == list(range(0, 41, 2))   # step 0, then 20
    periodic = {r["step"] for r in records if r["kind"] == "checkpoint"}
    assert set(range(4, 41, 4)) <= periodic                   # checkpoint_every auto = 2 x eval_every


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(home, stdlib_project, learnable_model_dir, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): same batches, same per-token loss normalisation,
    so the same losses step by step as a single process, and the same run files."""
    from refact_lab.finetune.runs import RunService

    settings = quick_settings(train_steps=6, eval_every=3, checkpoint_every=3, precision="fp32")
    records = []
    fit(str(learnable_model_dir), load_dataset(home, stdlib_project), settings, tmp_path / "single",
        sinks=[records.append], log=lambda m: None)
    service = RunService(home)
    run_id = service.start(stdlib_project, str(learnable_model_dir), settings, num_processes=2, cpu=True)
    status = service.wait(run_id, timeout=300)
    log = service.log_tail(run_id, 200)
    assert status["state"] == "finished", log
    assert status["world_size"] == 2 and "x2" in log
    single = [(r["step"], r.get("loss", r.get("test_loss"))) for r in records if r["kind"] in ("train", "test")]
    double = [(r["step"], r.get("loss", r.get("test_loss"))) for r in service.metrics(run_id)]
    assert [s for s, _ in single] == [s for s, _ in double]
    for (_, a), (_, b) in zip(single, double):
        assert a == pytest.approx(b, rel=1e-4)
    assert [c["name"] for c in service.checkpoints(run_id)] == ["step-000003", "step-000006"]


def test_out_of_memory_retries_with_low_gpu_mem_mode_and_says_so(home, stdlib_project, learnable_model_dir,
                                                                  tmp_path):
    """No GPU here, so the out-of-memory error is raised where CUDA would raise it, inside a training step
    (from a sink, the trainer's own extension point); the retry itself, with gradient checkpointing, is real."""
    from refact_lab.finetune.runs import MetricsFileSink

    seen = {}

    def oom_once(record):
        if record["kind"] == "start":
            seen["low_mem"] = record["low_gpu_mem_mode"]
        if record["kind"] == "train" and not seen["low_mem"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    records, lines = [], []
    (tmp_path / "run").mkdir()
    result = fit(str(learnable_model_dir), load_dataset(home, stdlib_project), quick_settings(train_steps=4),
                 tmp_path / "run", sinks=[MetricsFileSink(tmp_path / "run"), oom_once, records.append],
                 log=lines.append)
    assert result.state == "finished" and result.low_gpu_mem_mode and result.step == 4
    assert any("retrying with low_gpu_mem_mode on" in line for line in lines)
    assert any(r["kind"] == "info" and r.get("low_gpu_mem_mode") for r in records)
    assert any("gradient checkpointing" in line for line in lines)
    # the aborted attempt left no stray points in the curve
    from refact_lab.home import read_jsonl

    steps = [(m["kind"], m["step"]) for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps.count(("test", 0)) == 1 and [s for k, s in steps if k == "train"] == [1, 2, 3, 4]
