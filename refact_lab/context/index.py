"""The retrieval index of a project's accepted files: BM25 (bm25s) over chunks of whole lines.

The scan builds it after filtering (`build_index`), into `projects/<p>/index/<id>/`, switched in by the link
`index/current` as scan results are, so a server reading it never sees half an index. A file is chunked into
windows of WINDOW lines overlapping by half, so a definition cut by one window is whole in the next. Rebuilding
is incremental: the chunks of a file whose sha256 has not changed are reused from the previous index (no read,
no chunking); bm25s then rebuilds its matrix from the chunk list, which is cheap beside reading and chunking
(bench/retrieval.py measures both).

Code is tokenized for BM25 as identifiers and their parts: `convert_with_kestrel_rate` is one term and also
`convert`, `with`, `kestrel`, `rate`, so a cursor that has typed half a name still matches its definition.

`retrieve(...)` answers a query (the code around a cursor) with the best chunks of other files, within a
character budget; the server turns them into `Snippet`s for the prompt builder.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from refact_lab.home import DEFAULT_PROJECT, Home, atomic_write_text
from refact_lab.models.prompt import Snippet

WINDOW = 20          # lines per chunk
STRIDE = 10          # a new chunk every STRIDE lines: windows overlap by half
MAX_CHUNK_CHARS = 4000   # a minified line must not make one chunk the size of a file
MAX_TERMS = 400      # terms of a chunk beyond this add little to BM25 and cost build time
INDEX = "index"
CURRENT = "current"
INFO = "info.json"       # the build's file and chunk counts, for a scan that finds nothing changed
MANIFEST = "files.json"
CHUNKS = "chunks.jsonl"
BM25_DIR = "bm25"
CHARS_PER_TOKEN = 4  # to turn a token budget into a character budget before the builder counts exactly

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# Keywords and very common names say nothing about which file a cursor needs.
_STOP = frozenset("""self cls def class return import from as if else elif for while in is not and or none true false
pass try except finally with raise lambda yield the a an of to is it this that var let const function new int str
""".split())


def terms(text: str) -> list[str]:
    """BM25 terms of code: identifiers (lower-cased) and, for compound names, their parts."""
    out: list[str] = []
    for word in _IDENT.findall(text):
        out.extend(_word_terms(word))
    return out


@functools.lru_cache(maxsize=200_000)
def _word_terms(word: str) -> tuple[str, ...]:
    # Code repeats its names: splitting each distinct one once makes indexing several times faster.
    low = word.lower()
    out = [low] if low not in _STOP and len(low) > 1 else []
    if "_" in word or not (word.islower() or word.isupper()):
        out.extend(p for p in (q.lower() for q in _PARTS.findall(word)) if p != low and p not in _STOP and len(p) > 1)
    return tuple(out)


@dataclass(frozen=True)
class Chunk:
    path: str     # the file's path in its source ("pkg/rates.py")
    line: int     # first line, 0-based
    text: str


def chunk_text(path: str, text: str) -> list[Chunk]:
    """Windows of WINDOW whole lines every STRIDE lines; the last window reaches the end of the file."""
    lines = text.splitlines(keepends=True)
    out = []
    for start in range(0, max(len(lines) - WINDOW, 0) + 1, STRIDE):
        out.append(Chunk(path, start, "".join(lines[start:start + WINDOW])[:MAX_CHUNK_CHARS]))
    if len(lines) > WINDOW and (len(lines) - WINDOW) % STRIDE:
        start = len(lines) - WINDOW
        out.append(Chunk(path, start, "".join(lines[start:])[:MAX_CHUNK_CHARS]))
    return [c for c in out if c.text.strip()]


def _bm25(chunks: list[Chunk]):
    """A BM25 model of the chunks' terms."""
    import bm25s

    model = bm25s.BM25()
    model.index([terms(c.text)[:MAX_TERMS] for c in chunks], show_progress=False)
    return model


def index_dir(home: Home, project: str = DEFAULT_PROJECT) -> Path:
    return home.project_dir(project) / INDEX


def current_index(home: Home, project: str = DEFAULT_PROJECT) -> Path | None:
    link = index_dir(home, project) / CURRENT
    target = link.resolve() if link.is_symlink() else None
    return target if target is not None and target.is_dir() else None


def _read_previous(folder: Path | None) -> tuple[dict, dict[str, list[Chunk]]]:
    if folder is None:
        return {}, {}
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        by_path: dict[str, list[Chunk]] = {}
        with open(folder / CHUNKS, encoding="utf-8") as f:
            for line in f:
                path, start, text = json.loads(line)
                by_path.setdefault(path, []).append(Chunk(path, start, text))
        return manifest, by_path
    except (OSError, ValueError):
        return {}, {}   # an unreadable previous index only costs a full rebuild


def _unchanged(folder: Path | None, records: list[dict]) -> dict | None:
    """The previous index's counts and size when it indexed exactly these files with these contents, else None."""
    if folder is None:
        return None
    wanted: dict[str, str] = {}
    for r in records:
        if r.get("path") and r["path"] not in wanted:
            wanted[r["path"]] = r.get("sha256") or ""
    try:
        if not all(wanted.values()) or json.loads((folder / MANIFEST).read_text(encoding="utf-8")) != wanted:
            return None
        info = json.loads((folder / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"files": info["files"], "chunks": info["chunks"], "bytes": size}


def build_index(home: Home, project: str, records: Iterable[dict]) -> dict:
    """Index the accepted files `records` (scan records: path, file, sha256); returns the stats the scan reports:
    files, chunks, reused (files whose chunks came from the previous index), build seconds, bytes on disk."""
    started = time.perf_counter()
    records = list(records)
    previous_dir = current_index(home, project)
    unchanged = _unchanged(previous_dir, records)
    if unchanged is not None:
        # the same files with the same contents: the index in place is this one (a rebuild of a large project
        # costs about a minute and the scan's disk twice)
        return {**unchanged, "reused_files": unchanged["files"], "unchanged": True,
                "chunk_s": 0.0, "build_s": round(time.perf_counter() - started, 3)}
    old_manifest, old_chunks = _read_previous(previous_dir)
    manifest: dict[str, str] = {}
    chunks: list[Chunk] = []
    reused = 0
    for r in records:
        path, sha = r.get("path"), r.get("sha256")
        if not path or path in manifest:
            continue
        if sha and old_manifest.get(path) == sha and path in old_chunks:
            chunks.extend(old_chunks[path])
            reused += 1
        else:
            try:
                text = Path(r["file"]).read_text(encoding="utf-8", errors="replace")
            except (OSError, KeyError):
                continue   # gone since the scan read it: the next scan indexes it again
            chunks.extend(chunk_text(path, text))
        manifest[path] = sha or ""
    chunked_s = time.perf_counter() - started
    root = index_dir(home, project)
    root.mkdir(parents=True, exist_ok=True)
    build_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    tmp = root / f".{build_id}.tmp"
    tmp.mkdir()
    try:
        with open(tmp / CHUNKS, "w", encoding="utf-8") as f:
            for c in chunks:
                f.write(json.dumps([c.path, c.line, c.text]) + "\n")
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest))
        atomic_write_text(tmp / INFO, json.dumps({"files": len(manifest), "chunks": len(chunks)}))
        if chunks:
            _bm25(chunks).save(str(tmp / BM25_DIR), show_progress=False)
        folder = root / build_id
        os.rename(tmp, folder)
        link_tmp = root / f".{CURRENT}.{build_id}"
        os.symlink(build_id, link_tmp)
        os.replace(link_tmp, root / CURRENT)   # the switch: a reader sees the old index or the new one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old.is_dir() and not old.is_symlink() and old.name not in (build_id, previous_dir.name if previous_dir else ""):
            shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"files": len(manifest), "chunks": len(chunks), "reused_files": reused,
            "chunk_s": round(chunked_s, 3), "build_s": round(time.perf_counter() - started, 3), "bytes": size}


class ProjectIndex:
    """A loaded index, ready to answer queries; `IndexCache.get` reloads it when the scan switches in a new one."""

    def __init__(self, chunks: list[Chunk], model, folder: Path | None = None):
        self.folder = folder
        self.chunks = chunks
        self.model = model
        self._ranges: dict[str, tuple[int, int]] = {}
        for i, c in enumerate(self.chunks):   # chunks of a file are consecutive
            lo, _ = self._ranges.get(c.path, (i, i))
            self._ranges[c.path] = (lo, i + 1)
        self._by_name: dict[str, list[str]] = {}   # file name -> paths: excluding a file is a lookup, not a scan
        for path in self._ranges:
            self._by_name.setdefault(path.rsplit("/", 1)[-1], []).append(path)

    @classmethod
    def load(cls, folder: Path) -> "ProjectIndex":
        """The index the scan saved in `folder`."""
        import bm25s

        chunks: list[Chunk] = []
        with open(folder / CHUNKS, encoding="utf-8") as f:
            for line in f:
                path, start, text = json.loads(line)
                chunks.append(Chunk(path, start, text))
        return cls(chunks, bm25s.BM25.load(str(folder / BM25_DIR), show_progress=False) if chunks else None, folder)

    @classmethod
    def in_memory(cls, files: Iterable[tuple[str, str]]) -> "ProjectIndex":
        """An index of (path, text) pairs built in memory, chunked as the scan chunks (training uses it over
        its train files only, so a test file can never be retrieved)."""
        chunks = [c for path, text in files for c in chunk_text(path, text)]
        return cls(chunks, _bm25(chunks) if chunks else None)

    def _excluded(self, exclude_path: str | None) -> list[tuple[int, int]]:
        if not exclude_path:
            return []
        want = exclude_path.replace("\\", "/").lstrip("./")
        # A client names the file as it sees it (absolute, or from its git root); the index, from the source's
        # root: the same file when one path ends with the other at a '/' boundary.
        return [self._ranges[path] for path in self._by_name.get(want.rsplit("/", 1)[-1], [])
                if path == want or want.endswith("/" + path) or path.endswith("/" + want)]

    def retrieve(self, query: str, exclude_path: str | None = None, k: int = 4,
                 token_budget: int | None = None, exclude_text: str | None = None) -> list[Snippet]:
        """The best chunks for `query` from files other than `exclude_path`, best first, that fit the budget
        (approximately: the prompt builder counts tokens exactly); overlapping windows of one file count once.
        `exclude_text`: a file with a chunk holding this text is left out (the file being edited, unnamed)."""
        import numpy as np

        # each distinct term once: a name repeated around the cursor is not more relevant for it (and scoring
        # is a pass over every term's postings)
        q = [t for t in dict.fromkeys(terms(query)) if t in self.model.vocab_dict] if self.model is not None else []
        if not q:
            return []
        scores = self.model.get_scores(q)
        for lo, hi in self._excluded(exclude_path):
            scores[lo:hi] = 0
        n = min(len(self.chunks), 4 * k)
        top = np.argpartition(scores, -n)[-n:] if n < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        budget = None if token_budget is None else token_budget * CHARS_PER_TOKEN
        out: list[Snippet] = []
        taken: list[Chunk] = []
        used = 0
        hits = [(self.chunks[int(i)], float(scores[i])) for i in top if scores[i] > 0]
        banned = {c.path for c, _ in hits if exclude_text and exclude_text in c.text}
        for c, score in hits:
            if len(out) >= k:
                break
            if c.path in banned:
                continue
            if any(t.path == c.path and abs(t.line - c.line) < WINDOW for t in taken):
                continue
            if budget is not None and used + len(c.text) > budget:
                continue
            taken.append(c)
            used += len(c.text)
            out.append(Snippet(c.path, c.text))
        return out


class IndexCache:
    """Loaded indexes by project, reloaded when `index/current` points at a new build. Owned by whoever serves
    (one per server), never module-global."""

    def __init__(self, home: Home):
        self.home = home
        self._loaded: dict[str, ProjectIndex] = {}

    def get(self, project: str) -> ProjectIndex | None:
        folder = current_index(self.home, project)
        if folder is None:
            return None
        index = self._loaded.get(project)
        if index is None or index.folder != folder:
            index = self._loaded[project] = ProjectIndex.load(folder)
        return index


def retrieve(home: Home, project: str, query: str, exclude_path: str | None = None, k: int = 4,
             token_budget: int | None = None, cache: IndexCache | None = None) -> list[Snippet]:
    """Snippets of `project` for `query` (see ProjectIndex.retrieve); [] when the project has no index yet."""
    index = (cache or IndexCache(home)).get(project)
    return index.retrieve(query, exclude_path, k, token_budget) if index is not None else []


def cursor_query(prefix: str, suffix: str, lines_before: int = 15, lines_after: int = 5) -> str:
    """The code around a cursor, used as the retrieval query: the lines just before it and a few after."""
    return "".join(prefix.splitlines(keepends=True)[-lines_before:]) + "".join(
        suffix.splitlines(keepends=True)[:lines_after])


def index_for_scan(home: Home, project: str, accepted: list[dict]) -> dict:
    """The scan's hook: build the index of what it accepted and return its stats for stats.json. A failure
    (a full disk) is reported in the stats, never fails the scan: completions then go without context."""
    try:
        return build_index(home, project, accepted)
    except (OSError, ValueError) as e:
        return {"error": f"the retrieval index was not built: {e}"}
