"""Complete every scoreboard cursor through the serving engine, for the base model and LoRA checkpoints.

Served, not simulated: each cursor is prepared by `serve.prepare.prepare_around_cursor`, the function that
prepares a Tabby/IDE request on the API (the prompt cut to the model's context, the token budget), then
`Engine.generate` token-heals the prompt and applies the stop rules (single line, end-of-text) and the loop
guard exactly as for a request on the API. Decoding is greedy and
requests go one at a time, so two runs over the same cursors give the same texts (batching could reorder
floating-point sums between runs).

An engine serves the base model and one deployed adapter, so each checkpoint gets an engine started in this
process with that checkpoint deployed (a one-off override, settings.json is left alone); the base model is
completed with the LoRA off on the first of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from refact_lab.home import Home, read_json
from refact_lab.scoreboard.cursors import (
    DEFAULT_CURSORS, DEFAULT_SEED, KINDS, Cursor, fingerprint, project_definitions, sample_cursors,
)
from refact_lab.scoreboard.metrics import aggregate, score

SINGLE_LINE_TOKENS = 48
MULTI_LINE_TOKENS = 128

Progress = Callable[[str, int, int], None]


class EvalError(ValueError):
    """Bad input for an evaluation (no such project, run or checkpoint; no held-out files)."""


@dataclass(frozen=True)
class Target:
    """One model entry of the scoreboard: the base model (checkpoint None) or a LoRA checkpoint."""

    name: str
    lora: str | None              # "RUN/CHECKPOINT"
    checkpoint: object = None     # refact_lab.serve.checkpoints.Checkpoint


def project_cursors(home: Home, project: str, n: int = DEFAULT_CURSORS, seed: int = DEFAULT_SEED) -> list[Cursor]:
    """The project's cursor set: drawn from its held-out test files (the scan's split)."""
    from refact_lab.finetune.dataset import load_dataset

    try:
        dataset = load_dataset(home, project)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    # cross_file cursors call what the project defines in other files, held-out or not
    definitions = project_definitions(dataset.pairs("train") + dataset.pairs("test"))
    cursors = sample_cursors(dataset.pairs("test"), n, seed, definitions=definitions)
    if not cursors:
        raise EvalError(f"project {project!r} has no cursor positions in its {len(dataset.test)} test file(s)")
    return cursors


def project_runs(home: Home, project: str) -> list:
    """The project's runs (newest first) as serving sees them, with their checkpoints."""
    from refact_lab.finetune.runs import list_runs as list_statuses
    from refact_lab.serve.checkpoints import list_runs

    mine = {s["run_id"] for s in list_statuses(home) if s.get("project") == project}
    return [r for r in list_runs(home) if r.run_id in mine]


def resolve_targets(home: Home, project: str, model: str, run_id: str | None, choices: list[str]) -> list[Target]:
    """Base model first, then one Target per checkpoint choice (best | latest | NAME | off) of `run_id` (default:
    the project's newest run with a checkpoint). Raises EvalError saying what exists."""
    targets = [Target(model, None)]
    wanted = [c for c in choices if c != "off"]
    if not wanted:
        return targets
    from refact_lab.finetune.checkpoints import pick_checkpoint, pick_run

    try:
        run = pick_run(project_runs(home, project), run_id, f"project {project!r}")
        picked = [pick_checkpoint(run, choice) for choice in wanted]
    except ValueError as e:
        raise EvalError(str(e)) from None
    for ck in picked:
        if all(t.lora != ck.key for t in targets):
            targets.append(Target(f"{model}+{ck.key}", ck.key, ck))
    return targets


def trained_model(home: Home, run_id: str, status: dict | None = None) -> str | None:
    """The base model a run was trained on as its settings.json names it (a registry name, hub id or folder
    path), else status.json's "model". That one is a display name: for a model in a local folder only the
    folder's name, which no loader finds."""
    try:
        doc = read_json(home.run_dir(run_id) / "settings.json", {})
    except ValueError:
        doc = {}
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else (status or {}).get("model")


def run_model(home: Home, project: str) -> tuple[str, str]:
    """(the model to load, its name in the report): the base model a project's runs were trained on (newest
    run), else the active model."""
    from refact_lab.finetune.runs import list_runs as list_statuses

    for status in list_statuses(home):
        if status.get("project") == project and status.get("model"):
            return trained_model(home, status["run_id"], status), status["model"]
    from refact_lab.serve.state import active_model

    model = active_model(home)
    return model, model


def complete_all(engine, model_name: str, cursors: list[Cursor], progress: Progress | None = None,
                 label: str = "", context: bool = False) -> list[dict]:
    """Every cursor completed by `model_name` on `engine` (ready), with its scores and latency. `context`: the
    prompt gets snippets retrieved from the project's index as a served Tabby request does, never from the
    cursor's own file."""
    from refact_lab.serve.prepare import prepare_around_cursor

    rows = []
    for i, c in enumerate(cursors):
        started = time.perf_counter()
        prep = prepare_around_cursor(engine, c.prefix, c.suffix, SINGLE_LINE_TOKENS if c.single_line
                                     else MULTI_LINE_TOKENS, 0.0, c.single_line, None, model=model_name,
                                     repo_context=context, path=c.file)
        done = engine.generate(prep.ids, prep.params, model=prep.route.name, timeout=600)
        ms = (time.perf_counter() - started) * 1000
        around = c.prefix[-2000:] + c.suffix[:500]   # what the loop check may see repeated legitimately
        rows.append({"id": c.id, "kind": c.kind, "text": done["text"], "finish_reason": done["finish_reason"],
                     "ms": ms, "snippets": len(prep.snippets),
                     **score(done["text"], c.expected, single_line=c.single_line,
                             finish_reason=done["finish_reason"], context=around)})
        if progress:
            progress(label or model_name, i + 1, len(cursors))
    return rows


def summarize(target: Target, rows: list[dict]) -> dict:
    """One "models" entry of the report: overall and per-kind aggregates."""
    overall = aggregate(rows)
    overall.pop("n")
    return {"name": target.name, "lora": target.lora, "overall": overall,
            "by_kind": {k: aggregate([r for r in rows if r["kind"] == k]) for k in KINDS}}


def evaluate(home: Home, project: str, targets: list[Target], *, cursors: list[Cursor],
             progress: Progress | None = None, model: str | None = None, context: bool = False,
             context_tokens: int | None = None) -> tuple[dict, dict]:
    """(report, details): the printed/persisted scoreboard and the per-cursor completions behind it.
    `context`: repository context on, from `project`'s index (`context_tokens` of budget, default the
    serving default); off by default, so scores stay comparable with those measured before it existed."""
    from refact_lab.serve.client import LocalInference
    from refact_lab.serve.state import LoraChoice, lora_model_name

    model = model or targets[0].name
    per_target: dict[str | None, list[dict]] = {}
    # one engine per checkpoint (or one with the LoRA off when only the base model is asked for)
    deploy = [t for t in targets if t.lora] or [None]
    for i, t in enumerate(deploy):
        choice = LoraChoice("off") if t is None else LoraChoice("checkpoint", t.checkpoint.run_id,
                                                                  t.checkpoint.name)
        ctx = {"context": project if context else "off"}
        if context_tokens is not None:
            ctx["context_tokens"] = context_tokens
        inference = LocalInference(home, {"model": model, "lora": choice.to_dict(), **ctx})
        try:
            engine = inference.start().wait_ready(600)
            snap = engine.snapshot()
            if i == 0:
                per_target[None] = complete_all(engine, snap["model"], cursors, progress, targets[0].name, context)
            if t is not None:
                served = lora_model_name(snap["model"])
                if served not in snap["models"]:
                    raise EvalError(f"checkpoint {t.lora} could not be loaded: {snap['lora']['error']}")
                per_target[t.lora] = complete_all(engine, served, cursors, progress, t.name, context)
        finally:
            inference.stop()
    report = {"project": project, "cursors": len(cursors), "context": "on" if context else "off",
              "models": [summarize(t, per_target[t.lora]) for t in targets]}
    if context:   # how many cursors the index gave snippets to (0 means the project has no index)
        report["cursors_with_context"] = sum(r["snippets"] > 0 for r in per_target[None])
    details = {"fingerprint": fingerprint(cursors), "cursors": [c.summary() for c in cursors],
               "completions": {t.lora or "base": [{k: r[k] for k in ("id", "text", "exact_match", "edit_similarity")}
                                                  for r in per_target[t.lora]] for t in targets}}
    return report, details


def format_table(report: dict) -> str:
    """The scoreboard as text: one block per model, a row per kind and overall."""
    cols = ("exact_match", "edit_similarity", "identifier_f1", "named_right", "degenerate", "p50_ms")
    heads = ("KIND", "N", "EXACT", "EDIT SIM", "IDENT F1", "NAMED", "DEGEN", "P50 MS")
    lines = [f"project {report['project']}: {report['cursors']} cursors"
             + (f", repository context on ({report.get('cursors_with_context', 0)} with snippets)"
                if report.get("context") == "on" else "")]
    for m in report["models"]:
        lines.append("")
        lines.append(f"{m['name']}" + (f"  (LoRA {m['lora']})" if m["lora"] else "  (base model, LoRA off)"))
        rows = [heads]
        for kind, agg in [*m["by_kind"].items(), ("overall", {**m["overall"], "n": report["cursors"]})]:
            # .get: a report saved before a metric existed shows "-" there
            rows.append((kind, str(agg["n"]), *("-" if agg.get(c) is None else f"{agg[c]:.1f}" if c == "p50_ms"
                                               else f"{agg[c]:.3f}" for c in cols)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
        lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
    return "\n".join(lines)
