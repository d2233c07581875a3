"""Where scoreboards live, so the app shows them without recomputing.

- `runs/<run_id>/eval.json`: the latest scoreboard of the run's evaluated checkpoints, with the base model and
  the per-cursor completions (for the side-by-side samples). Entries over the same cursor set are merged by
  checkpoint; a different cursor set replaces the file.
- `projects/<project>/eval/latest.json`: the same for the project's most recent evaluation (base model only
  evaluations included).
- `projects/<project>/eval/history.jsonl`: one line per evaluation (time, cursor set, the models' scores).
"""

from __future__ import annotations

import os
import time

from refact_lab.home import Home, append_jsonl, atomic_write_json, read_json, read_jsonl


def eval_dir(home: Home, project: str):
    return home.project_dir(project) / "eval"


def run_eval_path(home: Home, run_id: str):
    return home.run_dir(run_id) / "eval.json"


def save(home: Home, report: dict, details: dict, *, seed: int) -> dict:
    """Persist one evaluation; returns the document written to the project's latest.json."""
    project = report["project"]
    now = time.time()
    doc = {**report, "seed": seed, "fingerprint": details["fingerprint"], "time": now, "details": details}
    d = eval_dir(home, project)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "latest.json", doc)
    append_jsonl(d / "history.jsonl", {k: v for k, v in doc.items() if k != "details"})
    runs = {m["lora"].split("/", 1)[0] for m in report["models"] if m["lora"]}
    for run_id in sorted(runs):
        path = run_eval_path(home, run_id)
        if not path.parent.is_dir():
            continue
        try:
            old = read_json(path, None)
        except ValueError:
            # a damaged eval.json (cut off, hand-edited) cannot be merged with, and must not make a finished
            # evaluation fail at its last step: this one replaces it, the damaged file kept beside it
            os.replace(path, path.with_name(path.name + ".damaged"))
            old = None
        keep = [m for m in report["models"] if m["lora"] is None or m["lora"].startswith(run_id + "/")]
        completions = {k: v for k, v in details["completions"].items() if k == "base" or k.startswith(run_id + "/")}
        if isinstance(old, dict) and old.get("fingerprint") == details["fingerprint"]:
            # same cursors: add this evaluation's checkpoints to the ones evaluated before
            fresh = {m["lora"] for m in keep}
            keep = [m for m in old.get("models", []) if m["lora"] not in fresh] + keep
            completions = {**old.get("details", {}).get("completions", {}), **completions}
        keep.sort(key=lambda m: (m["lora"] is not None, m["lora"] or ""))
        atomic_write_json(path, {**doc, "models": keep, "details": {**details, "completions": completions}})
    return doc


def run_eval(home: Home, run_id: str) -> dict | None:
    """The run's stored scoreboard (None: not evaluated); ValueError naming the file when it is damaged (the
    next evaluation replaces it, see `save`)."""
    path = run_eval_path(home, run_id)
    doc = read_json(path, None)
    if doc is not None and not (isinstance(doc, dict) and isinstance(doc.get("models"), list)
                                and all(isinstance(m, dict) for m in doc["models"])):
        raise ValueError(f"{path} is damaged: expected a scoreboard with a list of models")
    return doc


def latest(home: Home, project: str) -> dict | None:
    return read_json(eval_dir(home, project) / "latest.json", None)


def history(home: Home, project: str) -> list[dict]:
    path = eval_dir(home, project) / "history.jsonl"
    return read_jsonl(path) if path.is_file() else []


def public(doc: dict) -> dict:
    """The printed shape: project, cursors, repository context (when recorded), models."""
    return {"project": doc["project"], "cursors": doc["cursors"], "models": doc["models"],
            **{k: doc[k] for k in ("context", "cursors_with_context") if k in doc}}


def samples(doc: dict, lora: str, k: int = 5) -> dict:
    """The cursors where checkpoint `lora` gained most and lost most edit similarity against the base model:
    {"gained": [...], "lost": [...]}, each with the cursor (code before it, expected text) and both completions."""
    details = doc.get("details") or {}
    comps = details.get("completions") or {}
    base = {r["id"]: r for r in comps.get("base", [])}
    tuned = {r["id"]: r for r in comps.get(lora, [])}
    rows = []
    for c in details.get("cursors", []):
        b, t = base.get(c["id"]), tuned.get(c["id"])
        if b is None or t is None:
            continue
        delta = round(t["edit_similarity"] - b["edit_similarity"], 4)
        rows.append({**c, "base": b["text"], "tuned": t["text"], "delta": delta,
                     "base_es": round(b["edit_similarity"], 4), "tuned_es": round(t["edit_similarity"], 4)})
    gained = sorted((r for r in rows if r["delta"] > 0), key=lambda r: (-r["delta"], r["id"]))[:k]
    lost = sorted((r for r in rows if r["delta"] < 0), key=lambda r: (r["delta"], r["id"]))[:k]
    return {"gained": gained, "lost": lost}
