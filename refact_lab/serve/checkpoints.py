"""Fine-tuning runs and their LoRA checkpoints, as serving sees them; and what a `LoraChoice` means now.

The fine-tuning package owns the runs layout (`refact_lab.finetune.runs`: `runs/<run_id>/status.json` with
`best`, `checkpoints/step-NNNNNN/` peft adapter folders with metrics.json). This module only reads it through
that package's service functions and turns a choice (best / latest / a specific checkpoint / off) into the
adapter folder to load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from refact_lab.home import Home
from refact_lab.serve.state import LoraChoice


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    name: str
    path: Path          # the adapter folder (holds adapter_config.json)
    step: int | None = None
    test_loss: float | None = None

    @property
    def key(self) -> str:
        return f"{self.run_id}/{self.name}"


@dataclass(frozen=True)
class Run:
    run_id: str
    state: str
    created: float
    base_model: str | None
    checkpoints: tuple[Checkpoint, ...] = field(default_factory=tuple)
    best: str | None = None

    @property
    def latest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def checkpoint(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)

    @property
    def best_checkpoint(self) -> Checkpoint | None:
        return self.checkpoint(self.best) if self.best else None


def _run(home: Home, status: dict) -> Run:
    from refact_lab.finetune import runs as ft

    run_id = status["run_id"]
    cks = []
    best_flag = None
    for c in ft.list_checkpoints(home, run_id):
        path = Path(c["path"])
        if not (path / "adapter_config.json").is_file():
            continue
        cks.append(Checkpoint(run_id, c["name"], path, c.get("step"), c.get("test_loss")))
        if c.get("best"):
            best_flag = c["name"]
    best = status.get("best")
    best = best.get("checkpoint") if isinstance(best, dict) else best
    if not isinstance(best, str) or not any(c.name == best for c in cks):
        best = best_flag
    return Run(run_id, str(status.get("state", "unknown")), float(status.get("created_at") or 0),
               status.get("model"), tuple(cks), best)


def list_runs(home: Home) -> list[Run]:
    """Runs on disk with their checkpoints, newest first."""
    from refact_lab.finetune import runs as ft

    out = []
    for status in ft.list_runs(home):
        try:
            out.append(_run(home, status))
        except (FileNotFoundError, ValueError):
            continue  # a run folder deleted or half-written while we looked
    return out


def resolve(home: Home, choice: LoraChoice) -> Checkpoint | None:
    """The checkpoint a choice means right now (None for off). Raises ValueError saying what is missing."""
    if choice.mode == "off":
        return None
    runs = list_runs(home)
    if choice.run_id:
        run = next((r for r in runs if r.run_id == choice.run_id), None)
        if run is None:
            raise ValueError(f"no run {choice.run_id!r} in {home.runs_dir}")
    else:
        run = next((r for r in runs if r.checkpoints), None)
        if run is None:
            raise ValueError(f"no run with a checkpoint yet in {home.runs_dir}: fine-tune first")
    if not run.checkpoints:
        raise ValueError(f"run {run.run_id} has no checkpoint yet")
    if choice.mode == "checkpoint":
        found = run.checkpoint(choice.checkpoint)
        if found is None:
            raise ValueError(f"run {run.run_id} has no checkpoint {choice.checkpoint!r}; it has "
                             f"{', '.join(c.name for c in run.checkpoints)}")
        return found
    if choice.mode == "latest":
        return run.latest
    return run.best_checkpoint or run.latest
