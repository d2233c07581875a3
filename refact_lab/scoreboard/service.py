"""The scoreboard as the app and the fine-tune worker use it: read what was measured, evaluate a run's best
checkpoint (as a background job the panel observes), and the evaluation a run does when it finishes.

When a run finishes with `eval_cursors` > 0 its best checkpoint (lowest test loss) is scored against the base
model. With `best_by = edit_similarity` the checkpoints with the lowest test losses (up to MAX_CANDIDATES) are
scored and the one with the highest edit similarity becomes the run's best; status.json's `best` then says
`chosen_by: edit_similarity`, which Deploy shows.
"""

from __future__ import annotations

import threading
from pathlib import Path

from refact_lab.home import Home, read_json
from refact_lab.scoreboard import results, runner
from refact_lab.scoreboard.cursors import DEFAULT_SEED

MAX_CANDIDATES = 3


def evaluate_run(home: Home, run_id: str, n: int, *, best_by: str = "test_loss", progress=None) -> dict:
    """Score the run's best checkpoint (or its MAX_CANDIDATES lowest-loss ones for best_by=edit_similarity)
    against the base model over `n` cursors; persist and return the report."""
    status = read_json(home.run_dir(run_id) / "status.json", {}) or {}
    project, model = status.get("project"), runner.trained_model(home, run_id, status) or "default"
    label = status.get("model") or model   # the report names the model as the run does
    if not project:
        raise runner.EvalError(f"run {run_id} has no project in its status")
    run = next((r for r in runner.project_runs(home, project) if r.run_id == run_id), None)
    if run is None or not run.checkpoints:
        raise runner.EvalError(f"run {run_id} has no checkpoint to evaluate")
    if best_by == "edit_similarity":
        ranked = sorted(run.checkpoints, key=lambda c: (c.test_loss is None, c.test_loss or 0.0, c.name))
        names = [c.name for c in ranked[:MAX_CANDIDATES]]
    else:
        names = ["best"]
    targets = runner.resolve_targets(home, project, label, run_id, names)
    cursors = runner.project_cursors(home, project, n, DEFAULT_SEED)
    report, details = runner.evaluate(home, project, targets, cursors=cursors, progress=progress, model=model)
    results.save(home, report, details, seed=DEFAULT_SEED)
    if best_by == "edit_similarity":
        from refact_lab.finetune.runs import update_status

        tuned = [m for m in report["models"] if m["lora"]]
        top = max(tuned, key=lambda m: (m["overall"]["edit_similarity"], -tuned.index(m)))
        ck = run.checkpoint(top["lora"].split("/", 1)[1])
        update_status(home.run_dir(run_id), best={"checkpoint": ck.name, "step": ck.step, "test_loss": ck.test_loss,
                                                   "edit_similarity": top["overall"]["edit_similarity"],
                                                   "chosen_by": "edit_similarity"})
    return report


def after_run(path: Path) -> dict | None:
    """The worker's last step: evaluate a finished run if its settings ask for it. Never raises: a failed
    evaluation is logged in the run's log, the run stays finished."""
    from refact_lab.finetune.runs import append_log

    path = Path(path).resolve()
    doc = read_json(path / "settings.json", {}) or {}
    ft = doc.get("finetune") or {}
    n = int(ft.get("eval_cursors") or 0)
    status = read_json(path / "status.json", {}) or {}
    if n <= 0 or status.get("state") != "finished":
        return None
    try:
        report = evaluate_run(Home(path.parent.parent), path.name, n, best_by=ft.get("best_by") or "test_loss")
    except Exception as e:  # noqa: BLE001 - the run trained fine; the scoreboard is extra
        append_log(path, f"scoreboard: evaluation failed: {type(e).__name__}: {e}")
        return None
    lines = [f"  {m['name']}: edit similarity {m['overall']['edit_similarity']:.3f}, exact match "
             f"{m['overall']['exact_match']:.3f}" for m in report["models"]]
    append_log(path, f"scoreboard over {report['cursors']} held-out cursors:\n" + "\n".join(lines))
    return report


class ScoreboardService:
    """What the scoreboard panel calls: stored scoreboards, samples, and an evaluation job per service."""

    def __init__(self, home: Home | str | None = None):
        self.home = home if isinstance(home, Home) else Home.resolve(home)
        self._job: dict = {"state": "idle", "run_id": None, "done": 0, "total": 0, "error": None}
        self._lock = threading.Lock()

    def scoreboard(self, run_id: str) -> dict | None:
        return results.run_eval(self.home, run_id)

    def history(self, project: str) -> list[dict]:
        return results.history(self.home, project)

    def samples(self, run_id: str, lora: str, k: int = 5) -> dict:
        doc = self.scoreboard(run_id)
        return results.samples(doc, lora, k) if doc else {"gained": [], "lost": []}

    def job(self) -> dict:
        with self._lock:
            return dict(self._job)

    def start(self, run_id: str, n: int = 50) -> None:
        """Evaluate the run's best checkpoint in the background (one job at a time)."""
        with self._lock:
            if self._job["state"] == "running":
                raise RuntimeError(f"an evaluation of {self._job['run_id']} is running")
            self._job = {"state": "running", "run_id": run_id, "done": 0, "total": 0, "error": None}

        def progress(label: str, done: int, total: int) -> None:
            with self._lock:
                self._job.update(done=done, total=total, label=label)

        def work():
            try:
                evaluate_run(self.home, run_id, n, progress=progress)
                state, error = "finished", None
            except Exception as e:  # noqa: BLE001 - reported to the panel
                state, error = "failed", str(e)
            with self._lock:
                self._job.update(state=state, error=error)

        threading.Thread(target=work, name="scoreboard-eval", daemon=True).start()
