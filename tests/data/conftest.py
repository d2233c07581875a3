"""Helpers for the data tests: write a tree of files, make a real git repository, scan a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

# A real, ordinary Python file: what every scan should accept.
GOOD_PY = '''"""Small helpers for parsing configuration values."""

import os


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
'''


def good_py(variant: int) -> str:
    """Distinct, plausible Python files (distinct content so dedup keeps them all)."""
    return GOOD_PY + f"\n\ndef helper_{variant}(items):\n    return [item for item in items if item != {variant!r}]\n"


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def make_git_repo(root: Path, files: dict[str, str | bytes], message: str = "initial") -> "object":
    """A real repository with one commit (git through GitPython, as the product uses it)."""
    import git

    root.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(str(root), initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    commit(repo, files, message)
    return repo


def commit(repo, files: dict[str, str | bytes], message: str) -> str:
    root = Path(repo.working_tree_dir)
    write_tree(root, files)
    repo.index.add(list(files))
    return repo.index.commit(message).hexsha


def scan_folder(home, root: Path, **settings) -> tuple[dict, dict, dict]:
    """Add `root` as a folder source, run stage 1 (unless asked otherwise) and return
    ({path: accepted record}, {path: rejected record}, stats)."""
    from refact_lab.config import ScanSettings
    from refact_lab.data.pipeline import load_results, run_scan
    from refact_lab.data.sources import SourceStore

    store = SourceStore(home)
    if not store.find(str(root)):
        store.add_folder(root)
    settings.setdefault("lm_filter", False)
    stats = run_scan(home, settings=ScanSettings(**settings))
    accepted, rejected, _ = load_results(home)
    return {r["path"]: r for r in accepted}, {r["path"]: r for r in rejected}, stats


@pytest.fixture
def tree(tmp_path):
    """Write files under a fresh folder: `tree({"a.py": "..."})` returns the folder."""
    root = tmp_path / "tree"

    def make(files):
        return write_tree(root, files)

    return make
