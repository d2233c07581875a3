"""Update and retrain: fetch new commits, rescan incrementally, fine-tune from the deployed adapter, judge, and
deploy only what the scoreboard says is not worse.

`run_update(home, project)` does, in order:

1. **fetch**: every git source of the project fetches its branch's new commits (`SourceStore.refresh`; archives
   from a path are re-extracted when they changed; folders are read live by the scan).
2. **rescan** with the last scan's settings: files whose size and mtime did not change come from the scan's
   caches. `changed_files` counts accepted files added, removed or whose sha256 differs from the previous scan's
   accepted set. Zero changed files ends the update here: no training, nothing deployed, reason "no changes".
3. **fine-tune** a new run on the new dataset, starting from the deployed adapter's weights (`init_adapter`;
   the run takes the deployed run's model and LoRA settings, so the shapes match). Without a deployed adapter
   of this project the run starts from fresh LoRA weights.
4. **judge**: the scoreboard completes the same cursors (the project's held-out files, the default seed) with
   the base model, the deployed checkpoint and the new run's best checkpoint.
5. **gate** (`not_worse`, the one place the rule lives): the new checkpoint is deployed when its overall edit
   similarity is at most EDIT_SIMILARITY_TOLERANCE below the deployed one's and its exact match is not lower;
   without a deployed adapter it is compared with the base model. Otherwise the old choice stays and the
   reason says which number fell.

The result is the JSON `refact-lab update --json` prints: {"changed_files", "run", "deployed", "reason",
"before", "after", ...}; before/after are the scoreboard "overall" of the deployed (or base) and the new one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from refact_lab.config import FinetuneSettings, from_dict, with_overrides
from refact_lab.home import Home, read_json

# Edit similarity is a mean over cursors: a few cursors' noise moves it by thousandths, so "not worse" allows
# that much; exact match counts whole cursors and may not drop at all.
EDIT_SIMILARITY_TOLERANCE = 0.005
_EPS = 1e-9


class UpdateError(ValueError):
    """The update cannot proceed (a source cannot be fetched, the project was never scanned...)."""


class UpdateStopped(RuntimeError):
    """The update was asked to stop; what it had done so far stays (a fetched source, a finished scan)."""


def not_worse(before: dict, after: dict) -> tuple[bool, str]:
    """The deploy gate: (deploy?, why), comparing scoreboard "overall" dicts of the deployed and new checkpoint."""
    es_b, es_a = before["edit_similarity"], after["edit_similarity"]
    em_b, em_a = before["exact_match"], after["exact_match"]
    if es_a < es_b - EDIT_SIMILARITY_TOLERANCE - _EPS:
        return False, (f"edit similarity fell from {es_b:.3f} to {es_a:.3f} (more than the "
                       f"{EDIT_SIMILARITY_TOLERANCE} tolerance): kept the deployed adapter")
    if em_a < em_b - _EPS:
        return False, f"exact match fell from {em_b:.3f} to {em_a:.3f}: kept the deployed adapter"
    return True, (f"not worse: edit similarity {es_b:.3f} -> {es_a:.3f}, exact match {em_b:.3f} -> {em_a:.3f}")


def changed_files(before: list[dict], after: list[dict]) -> int:
    """Accepted files added, removed or changed (by sha256) between two scans' accepted sets."""
    old = {(r.get("source"), r.get("path")): r.get("sha256") for r in before}
    new = {(r.get("source"), r.get("path")): r.get("sha256") for r in after}
    return sum(1 for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def fetch_sources(home: Home, project: str, log: Callable[[str], None]) -> None:
    """Bring every source of the project up to date; an unreachable remote stops the update (nothing lost)."""
    from refact_lab.data.sources import SourceError, SourceStore

    store = SourceStore(home, project)
    sources = store.list()
    if not sources:
        raise UpdateError(f"project {project!r} has no sources in {home.root}")
    for s in sources:
        try:
            fresh = store.refresh(s.id)
        except SourceError as e:
            raise UpdateError(f"cannot fetch {s.name}: {e}") from None
        if fresh.kind == "git":
            lu = fresh.last_update or {}
            log(f"fetched {fresh.name}: {str(lu.get('from') or '')[:10]} -> {str(lu.get('to') or '')[:10]}, "
                f"{lu.get('changed', 0)} file(s) changed in git")


def rescan(home: Home, project: str, log: Callable[[str], None]) -> tuple[int, dict]:
    """Scan again with the last scan's settings; (changed accepted files, stats)."""
    from refact_lab.data import pipeline
    from refact_lab.data.jobs import ScanJob

    before, _, stats = pipeline.load_results(home, project)
    if stats is None:
        raise UpdateError(f"project {project!r} has never been scanned: run `refact-lab scan` first")
    new_stats = ScanJob(home, project).run(pipeline.settings_from_stats(stats))
    after, _, _ = pipeline.load_results(home, project)
    n = changed_files(before, after)
    log(f"rescan: {new_stats['accepted']} accepted, {n} changed since the last scan "
        f"({new_stats.get('files_read', 0)} read, {new_stats.get('files_cached', 0)} from the cache)")
    return n, new_stats


def deployed_of_project(home: Home, project: str):
    """The deployed checkpoint when it belongs to a run of `project`, else None."""
    from refact_lab.keep_current.deploys import deployed_checkpoint, run_project

    ck = deployed_checkpoint(home)
    return ck if ck is not None and run_project(home, ck.run_id) == project else None


def run_settings(home: Home, project: str, deployed) -> tuple[str, FinetuneSettings]:
    """(model, settings) of the new run: the deployed run's (same model and LoRA shape), else the project's
    newest run's, else the active model with default settings."""
    from refact_lab.finetune.runs import list_runs
    from refact_lab.serve.state import active_model

    run_ids = [deployed.run_id] if deployed else [s["run_id"] for s in list_runs(home) if s.get("project") == project]
    for run_id in run_ids[:1]:
        doc = read_json(home.run_dir(run_id) / "settings.json", {}) or {}
        if doc.get("model"):
            return doc["model"], from_dict(FinetuneSettings, doc.get("finetune") or {})
    return active_model(home), FinetuneSettings()


def run_update(home: Home, project: str, *, overrides: list[str] | None = None, cursors: int | None = None,
               log: Callable[[str], None] = print, should_stop: Callable[[], bool] | None = None,
               on_run: Callable[[str], None] | None = None) -> dict:
    """Fetch, rescan, retrain from the deployed adapter, judge and maybe deploy (see the module docstring).
    `overrides`: `key=value` fine-tuning settings for the new run; `cursors`: scoreboard size (default: the
    settings' eval_cursors). Raises UpdateError for bad input, UpdateStopped when asked to stop."""
    from refact_lab.finetune import runs
    from refact_lab.finetune.checkpoints import select
    from refact_lab.keep_current.deploys import deploy
    from refact_lab.scoreboard import results, runner
    from refact_lab.scoreboard.cursors import DEFAULT_CURSORS, DEFAULT_SEED

    stop = should_stop or (lambda: False)

    def check_stop(where: str) -> None:
        if stop():
            raise UpdateStopped(f"stopped {where}")

    fetch_sources(home, project, log)
    check_stop("after fetching")
    n_changed, stats = rescan(home, project, log)
    out = {"project": project, "changed_files": n_changed, "run": None, "deployed": False, "reason": "",
           "before": None, "after": None, "scan": {k: stats.get(k) for k in ("accepted", "files_read",
                                                                              "files_cached")}}
    if n_changed == 0:
        return {**out, "reason": "no changes"}
    check_stop("after the rescan")

    deployed = deployed_of_project(home, project)
    model, settings = run_settings(home, project, deployed)
    settings = with_overrides(settings, overrides or [])
    n = cursors or settings.eval_cursors or DEFAULT_CURSORS
    # this update judges the run itself (deployed and new on the same cursors), not the run's own evaluation
    settings = replace(settings, eval_cursors=0)
    run_id = runs.create_run(home, project, model, settings, init_adapter=str(deployed.path) if deployed else None)
    out["run"] = run_id
    out["init_adapter"] = deployed.key if deployed else None
    if on_run:
        on_run(run_id)
    path = home.run_dir(run_id)
    log(f"run {run_id}: fine-tuning {model} "
        + (f"from the deployed adapter {deployed.key}" if deployed else "from scratch (no adapter of this "
                                                                        "project is deployed)"))
    result = runs.execute_run(path, log=lambda m: runs.append_log(path, m))
    status = runs.read_status(home, run_id)
    if result is None or status.get("state") != "finished":
        if status.get("state") == "stopped":
            raise UpdateStopped(f"the run {run_id} was stopped")
        return {**out, "reason": f"the run {run_id} {status.get('state')}: {status.get('error') or 'see its log'}"}
    check_stop("after training")

    new = select(home, "best", run_id)
    targets = [runner.Target(model, None)]
    if deployed:
        targets.append(runner.Target(f"{model}+{deployed.key}", deployed.key, deployed))
    targets.append(runner.Target(f"{model}+{new.key}", new.key, new))
    try:
        points = runner.project_cursors(home, project, n, DEFAULT_SEED)
        log(f"scoreboard: {len(points)} cursors, {len(targets)} models")
        report, details = runner.evaluate(home, project, targets, cursors=points, model=model)
    except runner.EvalError as e:
        return {**out, "reason": f"the scoreboard could not judge the new checkpoint: {e}"}
    results.save(home, report, details, seed=DEFAULT_SEED)
    overall = {m["lora"]: m["overall"] for m in report["models"]}
    before, after = overall[deployed.key if deployed else None], overall[new.key]
    ok, why = not_worse(before, after)
    out.update(before=before, after=after, reason=why, checkpoint=new.key,
               compared_with=deployed.key if deployed else "base model")
    check_stop("before deploying")
    if ok:
        deploy(home, f"{run_id}/{new.name}", by="update", scores=after, project=project,
               note=f"update: {n_changed} changed file(s)")
        out["deployed"] = True
    log(("deployed " if ok else "not deployed ") + f"{new.key}: {why}")
    return out
