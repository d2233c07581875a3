"""Shared fixtures: an isolated state directory and a tiny model built on the fly (no hub is reachable)."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh state directory, also exported as REFACT_LAB_HOME for code that reads the environment."""
    from refact_lab.home import Home

    root = tmp_path / "home"
    monkeypatch.setenv("REFACT_LAB_HOME", str(root))
    return Home.resolve(root).ensure()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised 2-layer Llama with a BPE tokenizer carrying Qwen-style FIM tokens."""
    from refact_lab.models.tokenizer_build import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
