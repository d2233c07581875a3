"""Every deploy of an adapter, with its scores: the one function that changes the deployed LoRA and records it.

`deploy(home, choice, by=...)` is called by the Deploy panel (through `DeployService.deploy`), by the update
(`refact-lab update`) and by a rollback. It checks the choice can be served, saves it in settings.json and
appends one line to `projects/<project>/eval/deploys.jsonl`:

    {"time", "by", "choice": LoraChoice, "checkpoint": "RUN/CHECKPOINT" (what the choice meant then),
     "project", "scores": scoreboard "overall" of that checkpoint or null, "note"}

The project is the deployed run's. Scores not given are looked up in the run's eval.json (null when that
checkpoint was never evaluated). Switching the LoRA off is recorded in the project of the adapter it replaced.
A rollback re-deploys an entry's resolved checkpoint (not "best", which may mean another checkpoint today).
"""

from __future__ import annotations

import time

from refact_lab.home import Home, append_jsonl, read_json, read_jsonl
from refact_lab.serve import checkpoints, state
from refact_lab.serve.state import LoraChoice


def history_path(home: Home, project: str):
    return home.project_dir(project) / "eval" / "deploys.jsonl"


def run_project(home: Home, run_id: str) -> str | None:
    return (read_json(home.run_dir(run_id) / "status.json", {}) or {}).get("project")


def checkpoint_scores(home: Home, key: str) -> dict | None:
    """The scoreboard overall of checkpoint "RUN/CHECKPOINT" from its run's eval.json, if it was evaluated. A
    damaged eval.json counts as not evaluated: the scores are a note on the deploy, never a reason to refuse it."""
    try:
        doc = read_json(home.run_dir(key.split("/", 1)[0]) / "eval.json", None)
    except ValueError:
        return None
    models = doc.get("models") if isinstance(doc, dict) else None
    return next((m.get("overall") for m in models if isinstance(m, dict) and m.get("lora") == key), None) \
        if isinstance(models, list) else None


def deployed_checkpoint(home: Home) -> checkpoints.Checkpoint | None:
    """The checkpoint settings.json's choice means now (None when off or when it cannot be resolved)."""
    try:
        return checkpoints.resolve(home, state.load(home)[0].lora)
    except ValueError:
        return None


def deploy(home: Home, choice: LoraChoice | str, *, by: str, scores: dict | None = None, note: str = "",
           project: str | None = None) -> dict:
    """Save `choice` as the deployed LoRA and append it to its project's deploy history; returns the entry.
    Raises ValueError (saying what is missing) for a checkpoint that cannot be served."""
    choice = LoraChoice.parse(choice) if isinstance(choice, str) else choice
    before = deployed_checkpoint(home)
    ck = checkpoints.resolve(home, choice) if choice.mode != "off" else None
    key = ck.key if ck else None
    project = project or (run_project(home, ck.run_id) if ck else None) or \
        (run_project(home, before.run_id) if before else None)
    # the entry is complete before settings.json changes: a deploy is never saved without its history line
    entry = {"time": time.time(), "by": by, "choice": choice.to_dict(), "checkpoint": key, "project": project,
             "scores": scores if scores is not None else (checkpoint_scores(home, key) if key else None),
             "note": note}
    state.save(home, lora=choice)
    if project:  # nothing deployed before and nothing now (off over off): no project's history to change
        append_jsonl(history_path(home, project), entry)
    return entry


def history(home: Home, project: str) -> list[dict]:
    """The project's deploys, oldest first, each with its number `n` (what --rollback takes)."""
    path = history_path(home, project)
    return [{"n": i, **e} for i, e in enumerate(read_jsonl(path) if path.is_file() else [], 1)]


def rollback(home: Home, project: str, n: int | None = None) -> dict:
    """Re-deploy entry `n` of the project's history (default: the one before the latest). ValueError when there
    is no such entry or its checkpoint is gone."""
    entries = history(home, project)
    if n is None:
        if len(entries) < 2:
            raise ValueError(f"project {project!r} has {len(entries)} deploy(s): nothing earlier to roll back to")
        n = entries[-2]["n"]
    entry = next((e for e in entries if e["n"] == n), None)
    if entry is None:
        raise ValueError(f"project {project!r} has no deploy {n}; it has 1..{len(entries)}")
    key = entry["checkpoint"]
    choice = LoraChoice.parse(key) if key else LoraChoice("off")
    return deploy(home, choice, by="rollback", scores=entry["scores"], note=f"rollback to deploy {n}",
                  project=project)


def format_history(entries: list[dict]) -> str:
    """The history as text: number, time, who, checkpoint, edit similarity and exact match."""
    if not entries:
        return "no deploys yet"
    lines = []
    for e in entries:
        s = e.get("scores") or {}
        score = (f"edit sim {s['edit_similarity']:.3f}  exact {s['exact_match']:.3f}"
                 if s.get("edit_similarity") is not None else "not evaluated")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["time"]))
        lines.append(f"{e['n']:>3}  {when}  {e['by']:<8}  {e['checkpoint'] or 'off':<40}  {score}"
                     + (f"  ({e['note']})" if e.get("note") else ""))
    return "\n".join(lines)
