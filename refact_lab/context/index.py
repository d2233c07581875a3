"""The retrieval index of a project's accepted files: BM25 (bm25s) over chunks of whole definitions or lines.

The scan builds it after filtering (`build_index`), into `projects/<p>/index/<id>/`, switched in by the link
`index/current` as scan results are, so a server reading it never sees half an index. Files are chunked by
`chunking.chunk_file`: whole functions and classes where tree-sitter has a grammar, line windows otherwise.

Rebuilding is incremental. Each file's chunks and their BM25 terms (as ids into the store's vocabulary) are kept
in a store keyed by the file's content hash (`index/store-.../<sha[:2]>/<sha>.<kind>`), so a rescan reads, parses and
tokenizes only the files whose content is new; a file renamed or copied is not chunked again either. What bm25s
needs from all files, the term-frequency matrix, is then computed again from the stored ids in a few vectorized
passes (`_VectorBM25`, bm25s's own scoring functions), and the build folder holds only the file manifest and
that matrix: the chunks' text stays in the store (bench/retrieval.py measures a full build against a rebuild).

Code is tokenized for BM25 as identifiers and their parts: `convert_with_kestrel_rate` is one term and also
`convert`, `with`, `kestrel`, `rate`, so a cursor that has typed half a name still matches its definition.

`retrieve(...)` answers a query (the code around a cursor) with the best chunks of other files, within a
character budget; the server turns them into `Snippet`s for the prompt builder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from refact_lab.context import chunking
from refact_lab.context.chunking import MAX_CHUNK_CHARS, STRIDE, WINDOW, Chunk  # noqa: F401  (public names)
from refact_lab.data.filters import decode_text
from refact_lab.home import DEFAULT_PROJECT, Home, atomic_write_text
from refact_lab.models.prompt import Snippet

MAX_TERMS = 400      # terms of a chunk beyond this add little to BM25 and cost build time
TERMS_VERSION = 2    # bump when `terms` changes: the store's ids then no longer match and it starts afresh
INDEX = "index"
CURRENT = "current"
INFO = "info.json"       # the build's file and chunk counts and its store, for a scan that finds nothing changed
MANIFEST = "files.json"  # path -> content hash, in chunk order
CHUNKS = "chunks.jsonl"  # builds before the store kept their chunks here; still loadable
BM25_DIR = "bm25"
STORE = f"store-c{chunking.VERSION}-t{TERMS_VERSION}"
VOCAB = "vocab.json"
CHARS_PER_TOKEN = 4  # to turn a token budget into a character budget before the builder counts exactly

# Identifiers in any script (`größe`, `计算`; version 1 saw only ASCII, so `café` was the term "caf"), and numbers
_IDENT = re.compile(r"[^\W\d]\w*|\d+")
_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[^\W\d_A-Z]+|\d+")   # [a-z] for ASCII names; other letters too
# Keywords and very common names say nothing about which file a cursor needs.
_STOP = frozenset("""self cls def class return import from as if else elif for while in is not and or none true false
pass try except finally with raise lambda yield the a an of to is it this that var let const function new int str
""".split())


def terms(text: str) -> list[str]:
    """BM25 terms of code: identifiers (lower-cased) and, for compound names, their parts."""
    return list(chain.from_iterable(map(_word_terms, _IDENT.findall(text))))


@functools.lru_cache(maxsize=200_000)
def _word_terms(word: str) -> tuple[str, ...]:
    # Code repeats its names: splitting each distinct one once makes indexing several times faster.
    low = word.lower()
    out = [low] if low not in _STOP and len(low) > 1 else []
    if "_" in word or not (word.islower() or word.isupper()):
        out.extend(p for p in (q.lower() for q in _PARTS.findall(word)) if p != low and p not in _STOP and len(p) > 1)
    return tuple(out)


def chunk_text(path: str, text: str) -> list[Chunk]:
    """The chunks the index keeps for one file (see chunking.chunk_file)."""
    return chunking.chunk_file(path, text)


class _Counts:
    """Term counts of chunks, concatenated: chunk i has `sizes[i]` distinct terms, their ids in `ids` and counts
    in `tf`, and `lengths[i]` terms in all. How the stored files come together without a Python loop per chunk."""

    def __init__(self, sizes: np.ndarray, ids: np.ndarray, tf: np.ndarray, lengths: np.ndarray):
        self.sizes, self.ids, self.tf, self.lengths = sizes, ids, tf, lengths

    @classmethod
    def of(cls, ids: list[int], lengths: list[int]) -> "_Counts":
        """Counts of chunks given as their term ids, concatenated, and how many each has."""
        flat = np.array(ids, dtype=np.int64)
        lengths_ = np.array(lengths, dtype=np.int64)
        doc = np.repeat(np.arange(len(lengths_), dtype=np.int64), lengths_)
        # (chunk, term) pairs and how often each occurs: one sort per file
        width = int(flat.max(initial=0)) + 1
        pairs, tf = np.unique(doc * width + flat, return_counts=True)
        return cls(np.bincount(pairs // width, minlength=len(lengths_)).astype(np.int32),
                   (pairs % width).astype(np.int32), tf.astype(np.int32), lengths_.astype(np.int32))

    @classmethod
    def join(cls, parts: list["_Counts"]) -> "_Counts":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0, np.int32)
                     for f in ("sizes", "ids", "tf", "lengths")))


@functools.lru_cache(maxsize=None)
def _bm25_class():
    import bm25s
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

    class _VectorBM25(bm25s.BM25):
        """bm25s with its documented extension point, `build_index_from_ids`, computed from term counts in a few
        array passes: the same document frequencies, idf and term-frequency components (bm25s's own scoring
        functions), without bm25s's loop over chunks in Python (a minute for 10,000 files). The index it saves
        is plain bm25s; loaded through this class, a query's scores are summed in one pass."""

        @staticmethod
        def _compute_relevance_from_scores(data, indptr, indices, num_docs, query_tokens_ids, dtype):
            # a term's postings name each chunk once, so all the query terms' postings are summed by one
            # bincount (bm25s adds them term by term with np.add.at, several times slower on long postings)
            spans = [(indptr[t], indptr[t + 1]) for t in query_tokens_ids]
            rows = np.concatenate([indices[a:b] for a, b in spans]) if spans else np.zeros(0, np.int64)
            weights = np.concatenate([data[a:b] for a, b in spans]) if spans else np.zeros(0)
            return np.bincount(rows, weights=weights, minlength=num_docs).astype(dtype)

        def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True,
                                 leave_progress=False):
            if self.method in self.methods_requiring_nonoccurrence:
                raise ValueError(f"{self.method} is not supported by the vectorized build")
            self.nonoccurrence_array = None
            counts: _Counts = corpus_token_ids
            lengths = counts.lengths.astype(np.int64)
            n_docs, n_vocab = len(lengths), len(unique_token_ids)
            rows = np.repeat(np.arange(n_docs, dtype=np.int64), counts.sizes)
            cols = counts.ids.astype(np.int64)
            df = np.bincount(cols, minlength=n_vocab)
            idf = np.zeros(n_vocab, dtype=self.dtype)
            seen = np.unique(df[df > 0])   # idf depends on df alone: computed once per distinct df
            idf_fn = _select_idf_scorer(self.idf_method)
            per_df = np.array([idf_fn(int(d), N=n_docs) for d in seen], dtype=self.dtype)
            idf[df > 0] = per_df[np.searchsorted(seen, df[df > 0])]
            tfc = _select_tfc_scorer(self.method)(tf_array=counts.tf.astype(self.dtype), l_d=lengths[rows],
                                                  l_avg=lengths.mean() if n_docs else 1.0, k1=self.k1, b=self.b,
                                                  delta=self.delta)
            scores = (idf[cols] * tfc).astype(self.dtype)
            try:
                import scipy.sparse as sp   # installed with datasketch; bm25s does not require it
            except ImportError:
                data, indices, indptr = self._np_csc(scores, rows.astype(self.int_dtype), cols, (n_docs, n_vocab))
                return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
            # rows come in chunk order: the matrix is a CSR as it stands, and scipy turns it into bm25s's CSC
            # in one linear pass (bm25s's numpy builder sorts every entry: several seconds for 10,000 files)
            indptr = np.zeros(n_docs + 1, dtype=np.int64)
            np.cumsum(counts.sizes, out=indptr[1:])
            csc = sp.csr_matrix((scores, cols, indptr), shape=(n_docs, n_vocab)).tocsc()
            return {"data": csc.data.astype(self.dtype), "indices": csc.indices.astype(self.int_dtype),
                    "indptr": csc.indptr.astype(np.int64), "num_docs": n_docs}

    return _VectorBM25


def _bm25_from_counts(counts: _Counts, vocab: dict[str, int]):
    """A bm25s model of chunks given as term counts over `vocab`."""
    from bm25s.tokenization import Tokenized

    model = _bm25_class()()
    # a plain dict: the model must not grow the vocabulary when a query looks up an unknown term
    model.index(Tokenized(ids=counts, vocab=dict(vocab)), create_empty_token=False, show_progress=False)
    return model


class _Vocab(dict):
    """Term -> id, a new term taking the next id. Lookups go through map() over a word -> term ids cache, so a
    known identifier costs no Python call: tokenizing is most of the time a full build spends outside parsing."""

    def __init__(self, terms: list[str]):
        super().__init__((t, i) for i, t in enumerate(terms))
        self.terms = terms
        self._words = _WordIds(self)

    def __missing__(self, term: str) -> int:
        i = self[term] = len(self.terms)
        self.terms.append(term)
        return i

    def ids(self, chunks: list[Chunk]) -> _Counts:
        """The term counts of `chunks`: the ids of terms(text)[:MAX_TERMS] for each."""
        ids: list[int] = []
        lengths = []
        for c in chunks:
            n = len(ids)
            ids.extend(islice(chain.from_iterable(map(self._words.__getitem__, _IDENT.findall(c.text))), MAX_TERMS))
            lengths.append(len(ids) - n)
        return _Counts.of(ids, lengths)


class _WordIds(dict):
    """Identifier -> the ids of its terms in a vocabulary."""

    def __init__(self, vocab: _Vocab):
        super().__init__()
        self.vocab = vocab

    def __missing__(self, word: str) -> tuple[int, ...]:
        ids = self[word] = tuple(map(self.vocab.__getitem__, _word_terms(word)))
        return ids


def _bm25(chunks: list[Chunk]):
    """A BM25 model of the chunks' terms, with a vocabulary of its own (an in-memory index)."""
    vocab = _Vocab([])
    return _bm25_from_counts(vocab.ids(chunks), vocab)


class _Store:
    """Chunks and term counts of files by content hash and kind (`_key`), and the vocabulary the term ids index (append-only, so
    an id written once means the same term for as long as the store lives). An entry is one file: a JSON line
    (first lines, distinct terms and terms per chunk), the term ids and their counts as int32, then the texts
    as JSON, last, so a rebuild reads the numbers without decoding text. An entry that does not read back whole
    is chunked again; a vocabulary that does not read back starts the store afresh."""

    def __init__(self, folder: Path, writing: bool = False):
        self.folder = folder
        terms_: list[str] = []
        if writing:   # a reader (the server loading chunks) needs no vocabulary
            try:
                terms_ = json.loads((folder / VOCAB).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                shutil.rmtree(folder, ignore_errors=True)   # ids in the entries would mean nothing without it
        self.vocab = _Vocab(terms_)
        self._saved = len(terms_)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / key

    def _read(self, key: str) -> tuple[bytes, dict, int, int] | None:
        try:
            data = self._path(key).read_bytes()
            cut = data.index(b"\n") + 1
            head = json.loads(data[:cut])
            n = sum(head["sizes"])
            if not len(head["lines"]) == len(head["sizes"]) == len(head["lengths"]) or len(data) < cut + 8 * n:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return data, head, cut, n

    def counts(self, key: str) -> _Counts | None:
        """The term counts of a stored file, or None."""
        got = self._read(key)
        if got is None:
            return None
        data, head, cut, n = got
        ids = np.frombuffer(data, dtype=np.int32, count=n, offset=cut)
        if n and int(ids.max()) >= len(self.vocab.terms):
            return None
        return _Counts(np.array(head["sizes"], dtype=np.int32), ids,
                       np.frombuffer(data, dtype=np.int32, count=n, offset=cut + 4 * n),
                       np.array(head["lengths"], dtype=np.int32))

    def chunks(self, key: str, path: str) -> list[Chunk] | None:
        """The chunks of a stored file under `path`, or None."""
        got = self._read(key)
        if got is None:
            return None
        data, head, cut, n = got
        try:
            texts = json.loads(data[cut + 8 * n:])
        except ValueError:
            return None
        if len(texts) != len(head["lines"]):
            return None
        return [Chunk(path, line, text) for line, text in zip(head["lines"], texts)]

    def add(self, chunks: list[Chunk]) -> tuple[bytes, _Counts]:
        """Term counts of `chunks` (new terms join the vocabulary), and the entry that stores them."""
        counts = self.vocab.ids(chunks)
        head = json.dumps({"lines": [c.line for c in chunks], "sizes": counts.sizes.tolist(),
                           "lengths": counts.lengths.tolist()})
        texts = json.dumps([c.text for c in chunks])
        return (head.encode("ascii") + b"\n" + counts.ids.tobytes() + counts.tf.tobytes()
                + texts.encode("ascii")), counts

    def save(self, entries: dict[str, bytes]) -> None:
        """The vocabulary first (entries' ids must always be in it), then the new entries."""
        if len(self.vocab.terms) != self._saved or not (self.folder / VOCAB).exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / VOCAB, json.dumps(self.vocab.terms))
            self._saved = len(self.vocab.terms)
        for key, data in entries.items():
            path = self._path(key)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{key}.{secrets.token_hex(3)}.tmp")
            tmp.write_bytes(data)   # no fsync per entry: one that does not read back whole is chunked again
            os.replace(tmp, path)

    def prune(self, keep: set[str]) -> None:
        """Remove the entries of contents no kept build indexes."""
        for sub in self.folder.iterdir():
            if sub.is_dir():
                for entry in sub.iterdir():
                    if entry.name not in keep:
                        entry.unlink(missing_ok=True)


def _key(sha: str, path: str) -> str:
    """A file's key in the store: its content and how its kind of file is chunked."""
    return f"{sha}.{chunking.kind(path)}"


def index_dir(home: Home, project: str = DEFAULT_PROJECT) -> Path:
    return home.project_dir(project) / INDEX


def current_index(home: Home, project: str = DEFAULT_PROJECT) -> Path | None:
    link = index_dir(home, project) / CURRENT
    target = link.resolve() if link.is_symlink() else None
    return target if target is not None and target.is_dir() else None


def _manifest(folder: Path | None) -> dict[str, str]:
    try:
        got = json.loads((folder / MANIFEST).read_text(encoding="utf-8")) if folder is not None else {}
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}   # a damaged one names no files


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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
    if not isinstance(info, dict) or info.get("store") != STORE:
        return None   # built by another chunker or tokenizer version (or before the store existed): build again
    store = folder.parent / info["store"]
    if not all((store / sha[:2] / _key(sha, path)).is_file() for path, sha in wanted.items()):
        return None   # its chunks are gone from the store: build again
    try:
        ProjectIndex.load(folder)   # what the server will do with it (a tenth of a build's time)
    except IndexDamaged:
        return None   # a damaged BM25 matrix or store entry: a rescan is how a user repairs it, so build again
    store_bytes = _size(store) if store.is_dir() else 0
    return {"files": len(wanted), "chunks": info["chunks"], "bytes": _size(folder) + store_bytes,
            "store_bytes": store_bytes}


# Parsing is most of a first build (about 0.3 s per MB here) and holds the GIL: with more than one core, worker
# processes parse while this one tokenizes what they return. Below this many files a process start costs more.
_POOL_MIN_FILES = 300
_POOL_BATCH = 32


def _chunk_file(path: str, file: str) -> tuple[str, list[Chunk]] | None:
    """(sha256 of what was read, its chunks), or None when the file cannot be read any more."""
    try:
        data = Path(file).read_bytes()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest(), chunk_text(path, decode_text(data, errors="replace"))


def _chunk_batch(jobs: list[tuple[str, str]]) -> list[tuple[str, list[Chunk]] | None]:
    return [_chunk_file(*job) for job in jobs]


def _chunk_files(jobs: list[tuple[str, str]]) -> Iterator[tuple[str, list[Chunk]] | None]:
    """`_chunk_file` of each (path, file) job, in order; in worker processes when there are many and the cores."""
    workers = min((os.cpu_count() or 1) - 1, 7)
    if workers < 1 or len(jobs) < _POOL_MIN_FILES:
        yield from map(lambda job: _chunk_file(*job), jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the scan runs in a thread of a kernel that may hold other threads and locks
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_chunk_batch, jobs[i:i + _POOL_BATCH]) for i in range(0, len(jobs), _POOL_BATCH)]
        try:
            for fut in futures:
                yield from fut.result()
        finally:
            pool.shutdown(cancel_futures=True)


def build_index(home: Home, project: str, records: Iterable[dict]) -> dict:
    """Index the accepted files `records` (scan records: path, file, sha256); returns the stats the scan reports:
    files, chunks, reused_files (whose chunks and terms came from the store), chunked_files (read, parsed and
    tokenized in this build), chunk_s (the time that took), build_s (all of it), bytes (all of the index on
    disk) and store_bytes (of which the store: the chunks and term counts of the kept builds' files)."""
    started = time.perf_counter()
    records = list(records)
    previous_dir = current_index(home, project)
    unchanged = _unchanged(previous_dir, records)
    if unchanged is not None:
        # the same files with the same contents: the index in place is this one (a rebuild of a large project
        # costs seconds and the scan's disk twice)
        return {**unchanged, "reused_files": unchanged["files"], "chunked_files": 0, "unchanged": True,
                "chunk_s": 0.0, "build_s": round(time.perf_counter() - started, 3)}
    root = index_dir(home, project)
    store = _Store(root / STORE, writing=True)
    new: dict[str, bytes] = {}
    parts: dict[str, _Counts] = {}   # store key -> its chunks' term counts
    entries: list[tuple[str, str, str] | None] = []   # (path, sha, store key) in the records' order
    pending: list[tuple[int, str, str]] = []          # (entry, path, file) of the files to chunk
    seen: set[str] = set()
    reused = chunked = 0
    for r in records:
        path, sha = r.get("path"), r.get("sha256")
        if not path or path in seen:
            continue
        seen.add(path)
        key = _key(sha, path) if sha else None
        got = parts.get(key) if key else None
        if got is None and key:
            got = store.counts(key)
            if got is not None:
                parts[key] = got
        if got is not None:
            reused += 1
            entries.append((path, sha, key))
        elif r.get("file"):
            entries.append(None)
            pending.append((len(entries) - 1, path, r["file"]))
    for (i, path, _), done in zip(pending, _chunk_files([(p, f) for _, p, f in pending])):
        if done is None:
            continue   # gone since the scan read it: the next scan indexes it again
        # the hash of what was read: a file changed since the scan must not be stored under its old hash
        sha, chunks = done
        key = _key(sha, path)
        if key not in parts:
            new[key], parts[key] = store.add(chunks)
            chunked += 1
        entries[i] = (path, sha, key)
    manifest = {path: sha for path, sha, _ in filter(None, entries)}
    keys = [key for _, _, key in filter(None, entries)]
    n_chunks = sum(len(parts[key].sizes) for key in keys)
    chunked_s = time.perf_counter() - started
    root.mkdir(parents=True, exist_ok=True)
    store.save(new)
    build_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    tmp = root / f".{build_id}.tmp"
    tmp.mkdir()
    try:
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest))
        atomic_write_text(tmp / INFO, json.dumps({"files": len(manifest), "chunks": n_chunks, "store": STORE}))
        if n_chunks:
            counts = _Counts.join([parts[key] for key in keys])
            _bm25_from_counts(counts, store.vocab).save(str(tmp / BM25_DIR), show_progress=False)
        folder = root / build_id
        os.rename(tmp, folder)
        link_tmp = root / f".{CURRENT}.{build_id}"
        os.symlink(build_id, link_tmp)
        os.replace(link_tmp, root / CURRENT)   # the switch: a reader sees the old index or the new one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the previous build stays one build longer (a server may be loading it), with its store entries
    kept = {build_id, previous_dir.name if previous_dir else "", STORE, CURRENT}
    for old in root.iterdir():
        if old.name not in kept and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    store.prune(set(keys) | {_key(sha, path) for path, sha in _manifest(previous_dir).items()})
    store_bytes = _size(store.folder)
    return {"files": len(manifest), "chunks": n_chunks, "reused_files": reused, "chunked_files": chunked,
            "chunk_s": round(chunked_s, 3), "build_s": round(time.perf_counter() - started, 3),
            "bytes": _size(folder) + store_bytes, "store_bytes": store_bytes}


class IndexDamaged(OSError):
    """An index on disk that cannot be loaded (a file cut off or removed, a hand edit): served completions go
    without context, and the next scan builds it again."""


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
        """The index the scan saved in `folder`; IndexDamaged saying why when it cannot be read."""
        try:
            return cls._load(folder)
        except IndexDamaged:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file fails in json's, numpy's or bm25s's readers alike
            raise IndexDamaged(f"the retrieval index {folder} cannot be read ({type(e).__name__}: {e}); "
                               "scan the project again to rebuild it") from None

    @classmethod
    def _load(cls, folder: Path) -> "ProjectIndex":
        chunks: list[Chunk] = []
        if (folder / CHUNKS).exists():   # a build from before the store
            with open(folder / CHUNKS, encoding="utf-8") as f:
                for line in f:
                    path, start, text = json.loads(line)
                    chunks.append(Chunk(path, start, text))
        else:
            info = json.loads((folder / INFO).read_text(encoding="utf-8"))
            store = _Store(folder.parent / info["store"])
            for path, sha in _manifest(folder).items():
                got = store.chunks(_key(sha, path), path)
                if got is None:   # the matrix's rows would no longer match the chunks
                    raise IndexDamaged(f"the retrieval index {folder} lacks the chunks of {path}")
                chunks.extend(got)
            if len(chunks) != info["chunks"]:
                raise IndexDamaged(f"the retrieval index {folder} does not match its chunks")
        return cls(chunks, _bm25_class().load(str(folder / BM25_DIR), show_progress=False) if chunks else None,
                   folder)

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
        # only chunks sharing a term with the query compete: besides saving work, numpy's argpartition slows
        # down thirtyfold on an array of mostly equal values (the zeros of every other chunk)
        candidates = np.flatnonzero(scores)
        n = min(len(candidates), 4 * k)
        top = candidates[np.argpartition(scores[candidates], -n)[-n:]] if n < len(candidates) else candidates
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
            if any(t.path == c.path and t.line < c.end and c.line < t.end for t in taken):   # overlapping windows
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
        self._damaged: dict[str, tuple[Path, IndexDamaged]] = {}

    def get(self, project: str) -> ProjectIndex | None:
        """The project's current index, None when it has none; IndexDamaged when it cannot be loaded (not retried
        on every request: a server would read the broken files again for each completion)."""
        folder = current_index(self.home, project)
        if folder is None:
            return None
        index = self._loaded.get(project)
        if index is None or index.folder != folder:
            failed = self._damaged.get(project)
            if failed is not None and failed[0] == folder:
                raise failed[1]
            try:
                index = self._loaded[project] = ProjectIndex.load(folder)
            except IndexDamaged as e:
                self._loaded.pop(project, None)
                self._damaged[project] = (folder, e)
                raise
            self._damaged.pop(project, None)
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
