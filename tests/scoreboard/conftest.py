"""Fixtures for scoreboard tests: a project whose held-out files are real standard-library modules, and a run of
the embedded default model with real LoRA checkpoints in the runs layout."""

from __future__ import annotations

import pytest

from tests.finetune.conftest import write_dataset

# real code, small enough that a handful of cursors completes in seconds with the embedded default model
TRAIN = ["colorsys.py", "bisect.py", "keyword.py"]
TEST = ["textwrap.py", "sched.py"]


@pytest.fixture
def stdlib_eval_project(home):
    write_dataset(home, "stdlib", {"train": TRAIN, "test": TEST})
    return "stdlib"


@pytest.fixture
def default_run(home, stdlib_eval_project):
    """A finished run of the embedded default model on the project, two checkpoints (step 4 is best)."""
    from refact_lab.finetune.runs import update_status
    from refact_lab.models.registry import EMBEDDED_DIR
    from tests.serve.helpers import make_run

    make_run(home, "run-a", EMBEDDED_DIR, [4, 8], [1.0, 1.5], seed=3)
    update_status(home.run_dir("run-a"), project=stdlib_eval_project, model="default")
    return "run-a"
