"""The retrieval index: the scan builds it from a real project (this repository's own code), rebuilds only
changed files (their chunks and terms kept by content hash), its BM25 matrix is bm25s's own, and retrieval finds a
definition in another file while never returning the file being edited."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from refact_lab.context.index import (MAX_TERMS, STORE, IndexCache, ProjectIndex, _bm25, build_index, chunk_text,
                                      current_index, index_dir, retrieve, terms, WINDOW)
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
    chunks = chunk_text("a.txt", text)
    assert all(len(c.text.splitlines()) <= WINDOW and c.text.endswith("\n") for c in chunks)
    covered = {c.line + j for c in chunks for j in range(len(c.text.splitlines()))}
    assert covered == set(range(47))
    assert chunks[-1].text.endswith("line 46\n")


def test_identifier_parts_are_terms():
    assert {"convert_with_kestrel_rate", "convert", "kestrel", "rate"} <= set(terms("convert_with_kestrel_rate(x)"))
    assert {"httpserver", "http", "server"} <= set(terms("HTTPServer()"))


def test_identifiers_in_any_script_are_terms_and_retrieval_finds_them(home, tmp_path):
    # version 1 knew ASCII names only: `计算` gave no term and `größe` the term "gr"
    assert {"berechne_größe", "berechne", "größe", "计算"} <= set(terms("x = berechne_größe(计算(y))"))
    root = tmp_path / "unicode"
    root.mkdir()
    (root / "maße.py").write_text("def berechne_größe(breite, höhe):\n    return breite * höhe\n", encoding="utf-8")
    (root / "计算.py").write_text("def 计算总和(数字):\n    return sum(数字)\n", encoding="utf-8")
    (root / "other.py").write_text("def unrelated(a, b):\n    return a - b\n", encoding="utf-8")
    scan_folder(home, root)
    for query, want in (("fläche = berechne_größe(", "maße.py"), ("ergebnis = 计算总和(", "计算.py")):
        snippets = retrieve(home, "default", query, exclude_path="main.py", k=1, token_budget=500)
        assert [s.path for s in snippets] == [want], query


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
    assert stats2["index"]["reused_files"] == len(accepted) - 1 and stats2["index"]["chunked_files"] == 1
    assert current_index(home) != first   # a new build switched in; the previous one is kept one build longer
    cache = IndexCache(home)
    hit = retrieve(home, "default", "zebra_quokka_marker()", cache=cache)
    assert hit and hit[0].path == "refact_lab/models/prompt.py" and "zebra_quokka_marker" in hit[0].text
    # whole definitions (this one merged with the one before it), not a window that starts mid-function
    assert hit[0].text.startswith("def ") and hit[0].text.endswith("def zebra_quokka_marker():\n    return 1\n")


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


def test_an_index_built_by_another_chunker_version_is_built_again(home, tmp_path):
    import json

    from refact_lab.context.index import INFO

    root = _project(tmp_path)
    scan_folder(home, root)
    first = current_index(home)
    info = json.loads((first / INFO).read_text())
    info["store"] = "store-c0-t0"     # what an older release wrote (or none: before the store existed)
    (first / INFO).write_text(json.dumps(info))
    _, _, again = scan_folder(home, root)
    assert "unchanged" not in again["index"] and current_index(home) != first
    # this version's chunks of the same contents come from its own store (an older release's store has another
    # name, so after an upgrade every file is chunked again)
    assert again["index"]["reused_files"] == again["index"]["files"]


def test_the_matrix_is_the_one_bm25s_builds():
    import bm25s

    chunks = [c for p in sorted((ROOT / "refact_lab").rglob("*.py")) for c in chunk_text(str(p), p.read_text())]
    ours = _bm25(chunks)
    theirs = bm25s.BM25()
    theirs.index([terms(c.text)[:MAX_TERMS] for c in chunks], show_progress=False)
    for query in ("build_fim_ids tok fim prefix", "atomic_write_text json dumps", "class ProjectIndex retrieve"):
        q = [t for t in terms(query) if t in theirs.vocab_dict]
        ours_scores, their_scores = ours.get_scores(q), theirs.get_scores(q)
        assert their_scores.max() > 0 and np.allclose(ours_scores, their_scores, rtol=1e-5, atol=1e-6)


def test_a_saved_index_is_plain_bm25s_and_scores_the_same_loaded_either_way(home):
    import bm25s

    files = sorted((ROOT / "refact_lab").rglob("*.py"))
    build_index(home, "default", [_record(ROOT, str(p.relative_to(ROOT))) for p in files])
    ours = ProjectIndex.load(current_index(home))
    plain = bm25s.BM25.load(str(current_index(home) / "bm25"))
    for query in ("build_fim_ids tok fim prefix", "atomic_write_text json dumps", "zzz_not_a_term home"):
        q = [t for t in terms(query) if t in plain.vocab_dict]
        assert plain.get_scores(q).max() > 0
        assert np.allclose(ours.model.get_scores(q), plain.get_scores(q), rtol=1e-5, atol=1e-6)


def _record(root: Path, path: str) -> dict:
    import hashlib

    return {"path": path, "file": str(root / path), "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest()}


def test_the_store_keeps_chunks_by_content_and_a_damaged_entry_is_chunked_again(home, tmp_path):
    root = tmp_path / "p"
    files = {"rates.py": "def convert_with_kestrel_rate(x):\n    return x * KESTREL\n",
             "main.py": "from rates import convert_with_kestrel_rate\n\nprint(convert_with_kestrel_rate(2))\n",
             "util.go": "package util\n\nfunc Falcon() int {\n\treturn 1\n}\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    first = build_index(home, "default", [_record(root, p) for p in files])
    assert (first["chunked_files"], first["reused_files"]) == (3, 0) and first["store_bytes"] > 0
    # a rename (same content, new path) is not chunked again; the index answers with the new path
    (root / "rates.py").rename(root / "money.py")
    renamed = build_index(home, "default", [_record(root, p) for p in ("money.py", "main.py", "util.go")])
    assert (renamed["chunked_files"], renamed["reused_files"]) == (0, 3)
    hits = retrieve(home, "default", "convert_with_kestrel_rate", exclude_path="main.py")
    assert [h.path for h in hits] == ["money.py"] and hits[0].text == files["rates.py"]
    # a damaged entry (a crash while writing it) is chunked again, not trusted
    store = index_dir(home) / STORE
    sha = _record(root, "util.go")["sha256"]
    (store / sha[:2] / f"{sha}.go").write_bytes(b'{"lines": [0')
    (root / "main.py").write_text("print(1)\n")
    again = build_index(home, "default", [_record(root, p) for p in ("money.py", "main.py", "util.go")])
    assert again["chunked_files"] == 2 and again["reused_files"] == 1
    index = ProjectIndex.load(current_index(home))
    assert [c.path for c in index.chunks] == ["money.py", "main.py", "util.go"]
    assert "func Falcon() int {\n\treturn 1\n}" in index.retrieve("Falcon()")[0].text
    # entries no kept build indexes are removed: the old main.py's is gone after one more build
    build_index(home, "default", [_record(root, p) for p in ("money.py", "util.go")])
    kept = {p.name for p in store.glob("*/*")}
    assert _record(root, "main.py")["sha256"] + ".python" in kept and len(kept) == 3
    build_index(home, "default", [_record(root, "util.go")])
    assert {p.name for p in store.glob("*/*")} == {f"{sha}.go", _record(root, "money.py")["sha256"] + ".python"}


def test_the_same_content_under_another_kind_of_file_is_chunked_its_own_way(home, tmp_path):
    text = "".join(f"X_{i} = {i}\n" for i in range(12)) + "def long_one(x):\n" + "    x += 1\n" * 24 + "    return x\n"
    for name in ("a.py", "a.txt"):
        (tmp_path / name).write_text(text)
    stats = build_index(home, "default", [_record(tmp_path, "a.py"), _record(tmp_path, "a.txt")])
    assert stats["chunked_files"] == 2
    index = ProjectIndex.load(current_index(home))
    py = [c.text for c in index.chunks if c.path == "a.py"]
    txt = [c.text for c in index.chunks if c.path == "a.txt"]
    assert any(t.startswith("def long_one") and t.endswith("return x\n") for t in py)   # the definition, whole
    assert txt == [c.text for c in chunk_text("a.txt", text)] and py != txt             # windows


def test_chunking_in_worker_processes_builds_the_same_index(tmp_path, monkeypatch):
    import os

    from refact_lab.context import index as index_module
    from refact_lab.home import Home

    if (os.cpu_count() or 1) < 2:
        pytest.skip("worker processes are used only with more than one core")
    root = _project(tmp_path)
    serial_home = Home.resolve(tmp_path / "serial").ensure()
    _, _, serial = scan_folder(serial_home, root)
    pooled_home = Home.resolve(tmp_path / "pooled").ensure()
    calls = []
    real = index_module._chunk_file
    monkeypatch.setattr(index_module, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(index_module, "_chunk_file", lambda *job: calls.append(job) or real(*job))
    _, _, pooled = scan_folder(pooled_home, root)
    assert calls == []   # every file was parsed in a worker process (this process's _chunk_file never ran)
    for k in ("files", "chunks", "chunked_files"):
        assert pooled["index"][k] == serial["index"][k], k
    query = "zebra_quokka_marker()"
    a = retrieve(serial_home, "default", query)
    b = retrieve(pooled_home, "default", query)
    assert [(s.path, s.text) for s in a] == [(s.path, s.text) for s in b] and a
    manifest = index_module.MANIFEST
    assert (current_index(pooled_home) / manifest).read_text() == (current_index(serial_home) / manifest).read_text()
