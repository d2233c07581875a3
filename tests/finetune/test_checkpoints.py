"""Checkpoint names and which one is "best" (refact_lab.finetune.checkpoints), read from a run folder on disk."""

from __future__ import annotations

from refact_lab.finetune import checkpoints
from refact_lab.home import atomic_write_json


def _run(home, run_id: str, losses: dict[int, float | None], best: dict | None = None):
    path = home.run_dir(run_id)
    for step, loss in losses.items():
        atomic_write_json(path / "checkpoints" / checkpoints.checkpoint_name(step) / "metrics.json",
                          {"step": step, "test_loss": loss})
    status = {"run_id": run_id, "state": "running", "created_at": 1.0, "model": "m"}
    if best:
        status["best"] = best
    atomic_write_json(path / "status.json", status)
    return status


def test_best_without_a_record_is_the_lowest_test_loss_on_disk(home):
    status = _run(home, "r1", {10: 2.0, 20: 1.5, 30: 1.8, 40: None})
    run = checkpoints.run_view(home, status)
    assert [c.name for c in run.checkpoints] == ["step-000010", "step-000020", "step-000030", "step-000040"]
    assert run.best == "step-000020" and run.best_by == "test_loss"
    assert run.latest.name == "step-000040"


def test_the_trainers_record_wins_and_says_how_it_was_chosen(home):
    best = {"checkpoint": "step-000030", "step": 30, "test_loss": 1.8, "chosen_by": "edit_similarity"}
    status = _run(home, "r2", {10: 2.0, 20: 1.5, 30: 1.8}, best)
    run = checkpoints.run_view(home, status)
    assert run.best == "step-000030" and run.best_by == "edit_similarity"
    # a record naming a checkpoint that is gone falls back to the lowest loss on disk
    status["best"] = {"checkpoint": "step-000099"}
    assert checkpoints.run_view(home, status).best == "step-000020"
