"""Hostile input for repository context: an index damaged on disk (served completions go on without context, a
rescan repairs it) and files whose line breaks are not "\n"."""

from __future__ import annotations

import hashlib

import pytest

from refact_lab.context.index import (BM25_DIR, IndexCache, IndexDamaged, ProjectIndex, build_index, current_index,
                                      retrieve)
from refact_lab.context.serving import RepoContext
from refact_lab.models.prompt import Snippet
from refact_lab.serve.state import ServingChoice

FILES = {"rates.py": "def convert_with_kestrel_rate(amount):\n    return amount * 3\n",
         "main.py": "import rates\n\nprint(rates.convert_with_kestrel_rate(2))\n"}


def _records(root) -> list[dict]:
    out = []
    for name, text in FILES.items():
        (root / name).write_text(text)
        out.append({"path": name, "file": str(root / name), "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return out


def _truncate_bm25(folder) -> None:
    for p in (folder / BM25_DIR).iterdir():   # a disk that filled up while the files were written
        p.write_bytes(p.read_bytes()[:10])


def test_a_damaged_index_serves_completions_without_context_and_a_rescan_repairs_it(home, tmp_path):
    records = _records(tmp_path)
    build_index(home, "proj", records)
    _truncate_bm25(current_index(home, "proj"))
    ctx = RepoContext(home)
    choice = ServingChoice(context="proj")
    client = (Snippet("other.py", "x = 1\n"),)
    got = ctx.for_cursor(choice, None, "amount = convert_with_kestrel_", "", path="main.py", client=client)
    assert got.snippets == client and got.project == "proj"   # the completion goes on, the client's own kept
    assert "scan the project again" in ctx.error
    with pytest.raises(IndexDamaged, match="cannot be read"):
        retrieve(home, "proj", "convert_with_kestrel_rate")
    # the rescan finds the same files and contents: it must not trust the damaged build as "unchanged"
    stats = build_index(home, "proj", records)
    assert "unchanged" not in stats
    got = ctx.for_cursor(choice, None, "amount = convert_with_kestrel_", "", path="main.py")
    assert [s.path for s in got.snippets] == ["rates.py"] and ctx.error is None


def test_a_damaged_index_is_not_read_again_for_every_request(home, tmp_path, monkeypatch):
    build_index(home, "proj", _records(tmp_path))
    _truncate_bm25(current_index(home, "proj"))
    cache = IndexCache(home)
    loads = []
    real = ProjectIndex.load.__func__
    monkeypatch.setattr(ProjectIndex, "load", classmethod(lambda cls, folder: loads.append(folder) or real(cls, folder)))
    for _ in range(3):
        with pytest.raises(IndexDamaged):
            cache.get("proj")
    assert len(loads) == 1


def test_a_manifest_that_is_not_an_object_does_not_break_the_next_build(home, tmp_path):
    records = _records(tmp_path)
    build_index(home, "proj", records)
    (current_index(home, "proj") / "files.json").write_text("[1, 2]")
    stats = build_index(home, "proj", records)   # raised AttributeError, which the scan does not catch
    assert stats["files"] == 2
    assert [s.path for s in retrieve(home, "proj", "convert_with_kestrel_rate", exclude_path="main.py")] == ["rates.py"]


def test_overlapping_windows_of_a_file_with_cr_line_breaks_count_once():
    text = "".join(f"def cr_function_{i}():\r    return {i}\r" for i in range(20))   # 40 lines, old Mac style
    index = ProjectIndex.in_memory([("cr.py", text)])
    assert len(index.chunks) == 3   # windows 0-19, 10-29, 20-39
    snippets = index.retrieve("cr_function_12", k=4)
    # windows 0-19 and 20-39 do not overlap; 10-29 overlaps both, so at most two come back
    assert len(snippets) <= 2 and len({s.text for s in snippets}) == len(snippets)
