"""The retrieval index: the scan builds it from a real project (this repository's own code), rebuilds only
changed files, and retrieval finds a definition in another file while never returning the file being edited."""

from __future__ import annotations

import shutil
from pathlib import Path

from refact_lab.context.index import (IndexCache, chunk_text, current_index, retrieve, terms, WINDOW)
from tests.data.conftest import scan_folder

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path) -> Path:
    """A copy of the repository's refact_lab/*.py files (real code) as the project to scan."""
    root = tmp_path / "project"
    for p in (ROOT / "refact_lab").rglob("*.py"):
        dest = root / p.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    return root


def test_chunks_are_whole_lines_that_cover_the_file():
    text = "".join(f"line {i}\n" for i in range(47))
    chunks = chunk_text("a.py", text)
    assert all(len(c.text.splitlines()) <= WINDOW and c.text.endswith("\n") for c in chunks)
    covered = {c.line + j for c in chunks for j in range(len(c.text.splitlines()))}
    assert covered == set(range(47))
    assert chunks[-1].text.endswith("line 46\n")


def test_identifier_parts_are_terms():
    assert {"convert_with_kestrel_rate", "convert", "kestrel", "rate"} <= set(terms("convert_with_kestrel_rate(x)"))
    assert {"httpserver", "http", "server"} <= set(terms("HTTPServer()"))


def test_scan_builds_the_index_incrementally_and_retrieval_excludes_the_edited_file(home, tmp_path):
    root = _project(tmp_path)
    accepted, _, stats = scan_folder(home, root)
    assert "refact_lab/models/prompt.py" in accepted
    info = stats["index"]
    assert info["files"] == len(accepted) and info["chunks"] > info["files"]
    assert info["bytes"] > 0 and info["build_s"] >= 0 and info["reused_files"] == 0
    first = current_index(home)

    # a cursor in the engine typing a call to the prompt builder: the builder's definition comes back
    query = "        from refact_lab.models.prompt import build_fim_ids\n        ids = build_fim_ids(tok, fim, pre"
    snippets = retrieve(home, "default", query, exclude_path="refact_lab/serve/engine.py", k=3, token_budget=2000)
    assert "refact_lab/models/prompt.py" in [s.path for s in snippets]
    assert all(s.path != "refact_lab/serve/engine.py" for s in snippets)
    # excluding the builder's own file (as a client names it: an absolute path) removes it from the answers
    absolute = str(root / "refact_lab/models/prompt.py")
    assert all(s.path != "refact_lab/models/prompt.py"
               for s in retrieve(home, "default", query, exclude_path=absolute, k=5))
    # the budget bounds the characters returned
    small = retrieve(home, "default", query, k=5, token_budget=200)
    assert sum(len(s.text) for s in small) <= 800

    # change one file: only it is chunked again, and the new content is what retrieval finds
    (root / "refact_lab/models/prompt.py").write_text(
        (root / "refact_lab/models/prompt.py").read_text() + "\n\ndef zebra_quokka_marker():\n    return 1\n")
    _, _, stats2 = scan_folder(home, root)
    assert stats2["index"]["reused_files"] == len(accepted) - 1
    assert current_index(home) != first   # a new build switched in; the previous one is kept one build longer
    cache = IndexCache(home)
    hit = retrieve(home, "default", "zebra_quokka_marker()", cache=cache)
    assert hit and hit[0].path == "refact_lab/models/prompt.py" and "zebra_quokka_marker" in hit[0].text


def test_a_rescan_with_nothing_changed_keeps_the_index_in_place(home, tmp_path):
    root = _project(tmp_path)
    accepted, _, stats = scan_folder(home, root)
    first = current_index(home)
    _, _, again = scan_folder(home, root)
    assert again["index"]["unchanged"] is True and current_index(home) == first
    assert (again["index"]["files"], again["index"]["chunks"]) == (stats["index"]["files"], stats["index"]["chunks"])
    # one changed file: a new build
    (root / "refact_lab/models/prompt.py").write_text("x = 1\n" * 30)
    _, _, changed = scan_folder(home, root)
    assert "unchanged" not in changed["index"] and current_index(home) != first
