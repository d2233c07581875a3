"""Benchmark: does fine-tuning the embedded default model on a repository it never saw help at the cursor?

Fetches a small pure-Python package's source release (pinned; not among the default model's training
sources, see refact_lab/models/default/LICENSES.md) with `pip download --no-binary :all:`, scans it (rules
only), fine-tunes a LoRA briefly on its training files, and evaluates the base model (LoRA off, the baseline
measured in the same run) and the best checkpoint on the same seeded cursors of its held-out files, through
the serving engine (`refact_lab.scoreboard`). Prints both per kind of cursor, the difference, and whether the
fine-tune helped (overall edit similarity up by more than NOISE) and where it did not.

    nice -n 10 .venv/bin/python bench/eval.py                      # toolz 1.0.0, 200 cursors, 150 steps
    .venv/bin/python bench/eval.py --package more-itertools==10.5.0 --steps 300 --cursors 400
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NOISE = 0.005  # edit-similarity differences this small are within what a different cursor sample moves


def fetch(package: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", package,
                    "-d", str(into)], check=True)
    found = sorted(p for p in into.iterdir() if p.name.endswith((".tar.gz", ".zip")))
    if not found:
        raise SystemExit(f"pip download {package} left no source archive in {into}")
    return found[0]


def fine_tune(home, project: str, settings, label: str) -> tuple[str, dict]:
    """Create and run a fine-tune of the default model in this process; prints how it went."""
    from refact_lab.finetune import runs

    run_id = runs.create_run(home, project, "default", settings)
    started = time.time()
    runs.execute_run(home.run_dir(run_id), log=lambda m: None)
    status = runs.read_status(home, run_id)
    best = status.get("best") or {}
    print(f"fine-tune {label}: {status['state']} at step {status.get('step')} in {time.time() - started:.0f} s, "
          f"best {best.get('checkpoint')} (test loss {best.get('test_loss', float('nan')):.4f})", flush=True)
    return run_id, status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default="toolz==1.0.0", help="pinned PyPI source release (default toolz==1.0.0)")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default 150)")
    ap.add_argument("--cursors", type=int, default=200, help="scoreboard cursors (default 200)")
    ap.add_argument("--home", help="state directory to use (default: a temporary one)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args(argv)

    from refact_lab.config import FinetuneSettings, ScanSettings
    from refact_lab.data.service import ProjectService
    from refact_lab.home import Home
    from refact_lab.scoreboard import results, runner
    from refact_lab.scoreboard.cursors import DEFAULT_SEED, KINDS

    tmp = Path(tempfile.mkdtemp(prefix="refact-lab-bench-eval-"))
    home = Home.resolve(args.home or tmp / "home").ensure()
    project = "bench"
    archive = fetch(args.package, tmp)
    service = ProjectService(home, project)
    service.sources.ensure(str(archive))
    stats = service.job.run(ScanSettings(lm_filter=False))
    print(f"{args.package}: {stats['train']['files']} train files, {stats['test']['files']} held-out test files")

    settings = FinetuneSettings(train_steps=args.steps, eval_cursors=0, seq_len=512, batch_size=8,
                                learning_rate=1e-3, early_stop_patience=0)
    run_id, status = fine_tune(home, project, settings, "of the default model")

    targets = runner.resolve_targets(home, project, "default", run_id, ["best"])
    cursors = runner.project_cursors(home, project, args.cursors, DEFAULT_SEED)
    started = time.time()
    report, details = runner.evaluate(home, project, targets, cursors=cursors, model="default")
    results.save(home, report, details, seed=DEFAULT_SEED)
    print(f"scoreboard: {len(cursors)} cursors x {len(targets)} models in {time.time() - started:.0f} s\n")
    print(runner.format_table(report))

    base, tuned = report["models"][0], report["models"][1]
    print("\nfine-tuned - base (edit similarity, exact match):")
    verdicts = {}
    for kind in [*KINDS, "overall"]:
        b = base["overall"] if kind == "overall" else base["by_kind"][kind]
        t = tuned["overall"] if kind == "overall" else tuned["by_kind"][kind]
        if b["edit_similarity"] is None:
            continue
        d_es, d_em = t["edit_similarity"] - b["edit_similarity"], t["exact_match"] - b["exact_match"]
        verdicts[kind] = "helped" if d_es > NOISE else "hurt" if d_es < -NOISE else "no change"
        print(f"  {kind:<15} {b['edit_similarity']:.3f} -> {t['edit_similarity']:.3f} ({d_es:+.3f})   "
              f"{b['exact_match']:.3f} -> {t['exact_match']:.3f} ({d_em:+.3f})   {verdicts[kind]}")
    ratio = tuned["overall"]["edit_similarity"] / max(1e-9, base["overall"]["edit_similarity"])
    helped = verdicts["overall"] == "helped"
    print(f"\nedit similarity fine-tuned / base: {ratio:.3f}. The fine-tune {'helped' if helped else 'did not help'}"
          + (f"; not at: {', '.join(k for k, v in verdicts.items() if v != 'helped' and k != 'overall')}"
             if any(v != "helped" for k, v in verdicts.items() if k != "overall") else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"package": args.package, "run": status, "report": report,
                                               "verdicts": verdicts, "ratio": ratio}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
