"""Fixtures for update-and-retrain: a real git repository as the project's source (standard-library files),
a held-out folder source, a stage-1 scan, and a first run of the tiny learnable model that is deployed."""

from __future__ import annotations

import pytest

from tests.finetune.conftest import STDLIB, TEST_FILES, TRAIN_FILES, quick_settings  # noqa: F401
from tests.finetune.conftest import build_learnable_model, learnable_model_dir, one_cpu_thread  # noqa: F401

PROJECT = "proj"


@pytest.fixture
def upstream(tmp_path):
    from tests.data.conftest import make_git_repo

    files = {f"lib/{name}": (STDLIB / name).read_text() for name in TRAIN_FILES[:10]}
    return make_git_repo(tmp_path / "upstream", files)


@pytest.fixture
def scanned(home, tmp_path, upstream):
    """Project PROJECT: the git repository (train) and a folder of held-out files (test), scanned (stage 1)."""
    from pathlib import Path

    from refact_lab.config import ScanSettings
    from refact_lab.data.pipeline import run_scan
    from refact_lab.data.sources import SourceStore
    from tests.data.conftest import write_tree

    held = write_tree(tmp_path / "held_out", {name: (STDLIB / name).read_text() for name in TEST_FILES})
    store = SourceStore(home, PROJECT)
    store.add_git(Path(upstream.working_tree_dir).as_uri())
    store.add_folder(held, test=True)
    run_scan(home, PROJECT, ScanSettings(lm_filter=False))
    return PROJECT


@pytest.fixture
def deployed_run(home, scanned, learnable_model_dir):
    """A first 2-step run of the project, deployed through the one deploy function."""
    from refact_lab.finetune import runs
    from refact_lab.keep_current.deploys import deploy

    run_id = runs.create_run(home, scanned, str(learnable_model_dir),
                             quick_settings(train_steps=2, eval_every=1, checkpoint_every=1, eval_cursors=10))
    assert runs.execute_run(home.run_dir(run_id), log=lambda m: None) is not None
    deploy(home, run_id, by="deploy")
    return run_id
