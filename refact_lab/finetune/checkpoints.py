"""Checkpoint names and which checkpoint is "best" or "latest": the one owner of that part of a run folder.

    runs/<run_id>/checkpoints/step-NNNNNN/    peft adapter (adapter_config.json, adapter_model.safetensors),
                                              settings.json, metrics.json (step, test_loss, train_loss),
                                              trainer_state.pt (optimizer state; only in the latest)

The trainer writes checkpoints with these names; the run service lists them; serving (refact_lab.serve) and
the Deploy panel turn a choice (best / latest / a named checkpoint) into an adapter folder with `select`.
"Best" is the checkpoint with the lowest test loss: the trainer records it in status.json as it goes; where
that record is missing or names a checkpoint that is gone, the lowest test loss among the checkpoints on disk
decides (the earlier step on a tie, as the trainer does, since only a strictly lower loss replaces it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from refact_lab.home import Home

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_dirs(run_path: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (zero-padded step numbers sort by name)."""
    folder = Path(run_path) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def latest_resumable(run_path: Path) -> Path | None:
    """The newest checkpoint that holds what a resume needs (adapter weights and optimizer state)."""
    for ckpt in reversed(checkpoint_dirs(run_path)):
        if (ckpt / TRAINER_STATE).is_file() and (ckpt / ADAPTER_WEIGHTS).is_file():
            return ckpt
    return None


def adapter_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint's adapter files, in a few words; None when both can be read.
    Checkpoints are written whole (temp folder + rename), so this finds damage from outside: a truncated copy,
    a disk error, a hand edit. Reading the safetensors header checks that the file covers every tensor it lists
    (the data itself is not read)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{ADAPTER_CONFIG} cannot be read ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(config, dict):
        return f"{ADAPTER_CONFIG} is not a JSON object"
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError for a missing file)
        return f"{ADAPTER_WEIGHTS} cannot be read ({type(e).__name__}: {str(e)[:120]})"
    return None


def read_checkpoint(path: Path) -> dict:
    """The settings and metrics a checkpoint folder was saved with."""
    path = Path(path)
    out = {"name": path.name, "path": str(path)}
    for name in ("metrics.json", "settings.json"):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):   # missing, unreadable, not JSON or not UTF-8
            value = {}
        # a damaged file (a list, a number) reads as empty: every reader of every run calls .get on it
        out[name.split(".")[0]] = value if isinstance(value, dict) else {}
    return out


def _number(value) -> float | None:
    """A metric as a number, None where a damaged metrics.json holds something else (text, true)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    name: str
    path: Path          # the adapter folder (holds adapter_config.json once complete)
    step: int | None = None
    test_loss: float | None = None
    train_loss: float | None = None

    @property
    def key(self) -> str:
        return f"{self.run_id}/{self.name}"

    @property
    def loadable(self) -> bool:
        return (self.path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class Run:
    """A run as its checkpoints see it: state, base model, checkpoints (oldest first) and the best one's name."""

    run_id: str
    state: str
    created: float
    base_model: str | None
    checkpoints: tuple[Checkpoint, ...] = field(default_factory=tuple)
    best: str | None = None
    best_by: str = "test_loss"    # or "edit_similarity": the scoreboard chose it (FinetuneSettings.best_by)
    error: str | None = None      # why the run folder is broken (its status.json is missing or damaged)

    @property
    def latest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def checkpoint(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)

    @property
    def best_checkpoint(self) -> Checkpoint | None:
        return self.checkpoint(self.best) if self.best else None


def run_checkpoints(run_path: Path, run_id: str) -> list[Checkpoint]:
    out = []
    for ckpt in checkpoint_dirs(run_path):
        metrics = read_checkpoint(ckpt)["metrics"]
        step = _number(metrics.get("step"))
        out.append(Checkpoint(run_id, ckpt.name, ckpt, None if step is None else int(step),
                              _number(metrics.get("test_loss")), _number(metrics.get("train_loss"))))
    return out


def best_name(status: dict, checkpoints: list[Checkpoint]) -> str | None:
    """The best checkpoint's name: the trainer's record in status.json, else the lowest test loss on disk."""
    names = {c.name for c in checkpoints}
    recorded = status.get("best")
    recorded = recorded.get("checkpoint") if isinstance(recorded, dict) else recorded
    if isinstance(recorded, str) and recorded in names:
        return recorded
    scored = [c for c in checkpoints if c.test_loss is not None]
    if not scored:
        return None
    return min(scored, key=lambda c: (c.test_loss, c.step if c.step is not None else 0)).name


def run_view(home: Home, status: dict, *, loadable_only: bool = False) -> Run:
    run_id = status["run_id"]
    cks = run_checkpoints(home.run_dir(run_id), run_id)
    if loadable_only:     # serving can only load complete adapter folders
        cks = [c for c in cks if c.loadable]
    recorded = status.get("best")
    best_by = (recorded.get("chosen_by") if isinstance(recorded, dict) else None) or "test_loss"
    return Run(run_id, str(status.get("state", "unknown")), float(status.get("created_at") or 0),
               status.get("model"), tuple(cks), best_name(status, cks), best_by)


def list_runs(home: Home, *, loadable_only: bool = True) -> list[Run]:
    """Runs on disk with their checkpoints, newest first."""
    from refact_lab.finetune import runs as ft   # runs imports this module; the status reader lives there

    out = []
    for status in ft.list_runs(home):
        if status["state"] == ft.BROKEN:
            # listed, so asking for it says what is wrong; with no checkpoints, "the newest run" passes over it
            out.append(Run(status["run_id"], ft.BROKEN, 0.0, None, error=status["error"]))
            continue
        try:
            out.append(run_view(home, status, loadable_only=loadable_only))
        except (FileNotFoundError, ValueError):
            continue  # a run folder deleted or half-written while we looked
    return out


def pick_run(runs: list[Run], run_id: str | None, where: str) -> Run:
    """`run_id` among `runs`, or else the newest run that has a checkpoint; ValueError saying what `where`
    (the runs folder, a project) holds."""
    if run_id:
        run = next((r for r in runs if r.run_id == run_id), None)
        if run is None:
            raise ValueError(f"no run {run_id!r} in {where}; it has {', '.join(r.run_id for r in runs) or 'none'}")
        if run.error:
            raise ValueError(f"run {run_id} is broken: {run.error}")
    else:
        run = next((r for r in runs if r.checkpoints), None)
        if run is None:
            raise ValueError(f"no run with a checkpoint yet in {where}: fine-tune first")
    if not run.checkpoints:
        raise ValueError(f"run {run.run_id} has no checkpoint yet")
    return run


def pick_checkpoint(run: Run, choice: str) -> Checkpoint:
    """`best` (else the newest), `latest` or a checkpoint's name; ValueError listing what the run has."""
    found = {"best": run.best_checkpoint or run.latest, "latest": run.latest}.get(choice) or run.checkpoint(choice)
    if found is None:
        raise ValueError(f"run {run.run_id} has no checkpoint {choice!r}; it has best, latest, "
                         f"{', '.join(c.name for c in run.checkpoints)}")
    return found


def select(home: Home, mode: str, run_id: str | None = None, checkpoint: str | None = None) -> Checkpoint | None:
    """The checkpoint that `mode` (off / best / latest / checkpoint) means right now, in `run_id` or else the
    newest run that has one. None for off. Raises ValueError saying what is missing."""
    if mode == "off":
        return None
    if mode not in ("best", "latest", "checkpoint"):
        raise ValueError(f"lora: {mode!r} is not one of off, best, latest, checkpoint")
    run = pick_run(list_runs(home), run_id, str(home.runs_dir))
    return pick_checkpoint(run, (checkpoint or "") if mode == "checkpoint" else mode)
