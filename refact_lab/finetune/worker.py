"""The run process: `python -m refact_lab.finetune.worker RUN_DIR` (or under `accelerate launch`).

runs.start_run starts it detached with stdout and stderr appended to the run's log.txt. SIGTERM, and a first
SIGINT, ask for a clean stop (checkpoint, state "stopped"), like the panel's Stop button.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m refact_lab.finetune.worker RUN_DIR", file=sys.stderr)
        return 2
    from refact_lab.finetune.runs import execute_run, install_stop_on_signal

    path = Path(argv[0])
    if not (path / "settings.json").is_file():
        print(f"{path} is not a run folder (no settings.json)", file=sys.stderr)
        return 2
    install_stop_on_signal(path)
    if execute_run(path) is None:
        return 1
    from refact_lab.scoreboard.service import after_run

    import os

    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process of a multi-process launch
        after_run(path)  # the scoreboard of the best checkpoint, when the run's eval_cursors ask for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
