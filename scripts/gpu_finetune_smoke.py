"""Multi-GPU fine-tuning smoke test for a lent device machine (scripts/gpu_checks.sh runs it).

Builds the tests' tiny learnable model and standard-library dataset in a temporary state directory, then runs
`refact-lab finetune --processes auto` (one process per visible GPU) through the CLI, and prints how it ran:
world size, steps, the memory estimate line and the time per step. `--cpu` runs the same with 2 CPU processes
(the dry run on a machine without a GPU); `--fsdp` adds FSDP (needs 2+ GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes instead of the GPUs")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP (2+ GPUs)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from refact_lab.cli import main as cli
    from refact_lab.finetune import runs
    from refact_lab.home import Home
    from tests.finetune.conftest import TEST_FILES, TRAIN_FILES, build_learnable_model, write_dataset

    root = Path(tempfile.mkdtemp(prefix="gpu-finetune-smoke-"))
    home = Home.resolve(root / "home").ensure()
    model = build_learnable_model(root / "model")
    write_dataset(home, "smoke", {"train": TRAIN_FILES, "test": TEST_FILES})
    launch = ["--processes", "2", "--cpu"] if args.cpu else ["--processes", "auto"] + (["--fsdp"] if args.fsdp else [])
    sets = {"seq_len": 256, "batch_size": 8, "train_steps": args.steps, "eval_every": max(1, args.steps // 2),
            "lora_r": 8, "learning_rate": 1e-2, "eval_cursors": 0, "early_stop_patience": 0}
    t0 = time.perf_counter()
    code = cli(["finetune", "--home", str(home.root), "--project", "smoke", "--model", str(model), *launch,
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    wall = time.perf_counter() - t0
    listed = runs.list_runs(home)
    if not listed:
        print("no run was created", file=sys.stderr)
        return 1
    status = listed[0]
    run_id = status["run_id"]
    steps = [m for m in runs.read_metrics(home, run_id) if m["kind"] == "train"]
    step_s = sorted(m["step_s"] for m in steps)[len(steps) // 2] if steps else None
    doc = runs.RunService(home).settings(run_id)
    print(json.dumps({"exit": code, "state": status["state"], "world_size": status.get("world_size"),
                      "step": status.get("step"), "launch": doc.get("launch"), "median_step_s": step_s,
                      "wall_s": round(wall, 1), "error": status.get("error")}, indent=2, default=str))
    print(runs.log_tail(home, run_id, 15))
    return 0 if code == 0 and status["state"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
