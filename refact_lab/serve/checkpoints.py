"""Fine-tuning checkpoints as serving sees them: what a `LoraChoice` means now.

The fine-tuning package owns checkpoint names and which one is best or latest
(`refact_lab.finetune.checkpoints`); this module only adapts serving's `LoraChoice` to it, and re-exports
the `Checkpoint` and `Run` views the engine and the Deploy service use.
"""

from __future__ import annotations

from refact_lab.finetune.checkpoints import Checkpoint, Run, list_runs, select
from refact_lab.home import Home
from refact_lab.serve.state import LoraChoice

__all__ = ["Checkpoint", "Run", "list_runs", "resolve"]


def resolve(home: Home, choice: LoraChoice) -> Checkpoint | None:
    """The checkpoint a choice means right now (None for off). Raises ValueError saying what is missing."""
    return select(home, choice.mode, choice.run_id, choice.checkpoint)
