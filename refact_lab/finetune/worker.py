"""The run process: `python -m refact_lab.finetune.worker RUN_DIR` (or under `accelerate launch`).

runs.start_run starts it detached with stdout and stderr appended to the run's log.txt. SIGTERM asks for a
clean stop (checkpoint, state "stopped"), like the panel's Stop button.
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
    return 0 if execute_run(path) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
