"""Benchmark: does repository context help at the cursor, for the base model and for a fine-tune?

Fetches a pinned PyPI source release the embedded default model never saw (not in
refact_lab/models/default/LICENSES.md), scans it (rules only; the scan builds the retrieval index), fine-tunes
two LoRAs of the default model with the same settings except `context_rate` (0: single files; the given rate:
examples carry snippets of other training files), and evaluates the base model and both best checkpoints on the
same seeded cursors of the held-out files, with repository context off and on. The baseline is the base model
with context off, measured in the same run. `cross_file` cursors (a call of what another file defines) are the
ones where context should matter most; `named_right` says how often the name came back right.

    nice -n 10 .venv/bin/python bench/context.py                       # marshmallow 3.23.1, 200 cursors
    .venv/bin/python bench/context.py --package toolz==1.0.0 --steps 100 --context-rate 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.eval import NOISE, fetch, fine_tune  # noqa: E402  (the same download, fine-tune and noise level)

SHOWN = ("exact_match", "edit_similarity", "named_right")


def _fine_tune(home, project: str, steps: int, context_rate: float, reuse: bool) -> str:
    from refact_lab.config import FinetuneSettings
    from refact_lab.finetune import runs

    settings = FinetuneSettings(train_steps=steps, eval_cursors=0, seq_len=512, batch_size=8, learning_rate=1e-3,
                                early_stop_patience=0, context_rate=context_rate)
    if reuse:   # a finished run of this home with the same settings (an earlier, interrupted bench run)
        from refact_lab.home import read_json

        for status in runs.list_runs(home):
            ft = (read_json(home.run_dir(status["run_id"]) / "settings.json") or {}).get("finetune") or {}
            if status.get("state") == "finished" and ft.get("context_rate") == context_rate \
                    and ft.get("train_steps") == steps:
                print(f"fine-tune context_rate={context_rate}: reusing {status['run_id']}", flush=True)
                return status["run_id"]
    run_id, status = fine_tune(home, project, settings, f"context_rate={context_rate}")
    if status["state"] != "finished":
        raise SystemExit(f"the fine-tune failed: {status.get('error')}")
    return run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default="marshmallow==3.23.1", help="pinned PyPI source release")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps of each LoRA (default 150)")
    ap.add_argument("--context-rate", type=float, default=0.5, help="context_rate of the second LoRA (0.5)")
    ap.add_argument("--cursors", type=int, default=200, help="scoreboard cursors (default 200)")
    ap.add_argument("--no-finetune", action="store_true", help="the base model only (context off vs on)")
    ap.add_argument("--home", help="state directory to use (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="with --home: reuse its finished runs of these settings")
    ap.add_argument("--json", help="also write the reports to this file")
    args = ap.parse_args(argv)

    from refact_lab.config import ScanSettings
    from refact_lab.data.service import ProjectService
    from refact_lab.home import Home
    from refact_lab.scoreboard import runner
    from refact_lab.scoreboard.cursors import DEFAULT_SEED, KINDS

    tmp = Path(tempfile.mkdtemp(prefix="refact-lab-bench-context-"))
    home = Home.resolve(args.home or tmp / "home").ensure()
    project = "bench"
    service = ProjectService(home, project)
    service.sources.ensure(str(fetch(args.package, tmp)))
    stats = service.job.run(ScanSettings(lm_filter=False))
    index = stats.get("index") or {}
    print(f"{args.package}: {stats['train']['files']} train files, {stats['test']['files']} held-out test files; "
          f"index {index.get('chunks')} chunks of {index.get('files')} files", flush=True)

    run_ids = [] if args.no_finetune else [_fine_tune(home, project, args.steps, 0.0, args.reuse),
                                           _fine_tune(home, project, args.steps, args.context_rate, args.reuse)]
    targets = runner.resolve_targets(home, project, "default", None, [])
    names = {None: "base"}
    for run_id, label in zip(run_ids, ("lora ctx 0", f"lora ctx {args.context_rate:g}")):
        tuned = runner.resolve_targets(home, project, "default", run_id, ["best"])[-1]
        targets.append(tuned)
        names[tuned.lora] = label
    cursors = runner.project_cursors(home, project, args.cursors, DEFAULT_SEED)
    kinds = {k: sum(c.kind == k for c in cursors) for k in KINDS}
    print(f"{len(cursors)} cursors: " + ", ".join(f"{k} {n}" for k, n in kinds.items()), flush=True)

    reports = {}
    for context in (False, True):
        started = time.time()
        report, _ = runner.evaluate(home, project, targets, cursors=cursors, model="default", context=context)
        reports["on" if context else "off"] = report
        print(f"\ncontext {'on' if context else 'off'}: {len(targets)} models in {time.time() - started:.0f} s"
              + (f", {report.get('cursors_with_context')} cursors got snippets" if context else ""), flush=True)
        print(runner.format_table(report), flush=True)

    print("\nsummary (overall | cross_file), edit similarity / exact match / named right:")
    rows = {}
    for ctx, report in reports.items():
        for m in report["models"]:
            cross = m["by_kind"]["cross_file"]
            rows[(names[m["lora"]], ctx)] = (m["overall"], cross)
            print(f"  {names[m['lora']]:<14} context {ctx:<3}  "
                  + "  ".join(f"{m['overall'][k]:.3f}" for k in SHOWN) + "  |  "
                  + ("  ".join(f"{cross[k]:.3f}" for k in SHOWN) if cross["n"] else "no cross_file cursors"))
    base_off, base_on = rows[("base", "off")][0], rows[("base", "on")][0]
    ratio = base_on["edit_similarity"] / max(1e-9, base_off["edit_similarity"])
    gain = base_on["edit_similarity"] - base_off["edit_similarity"]
    print(f"\ncontext on / off, base model, edit similarity: {ratio:.3f}x "
          f"({'helped' if gain > NOISE else 'hurt' if gain < -NOISE else 'no change'})")
    for label in [n for n in names.values() if n != "base"]:
        on, off = rows[(label, "on")][0], rows[(label, "off")][0]
        print(f"context on / off, {label}, edit similarity: "
              f"{on['edit_similarity'] / max(1e-9, off['edit_similarity']):.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"package": args.package, "reports": reports}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
