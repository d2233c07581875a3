"""The scan runner: every file of every source ends in accepted.jsonl or rejected.jsonl, with a reason.

Stages, in order (each stage only sees what the previous kept, so cheap checks protect expensive ones):

1. list the sources' files (one lstat each) and name their languages (an archive whose members over the file
   size limit were left out at extraction is first extracted again if this scan's limit, or a force-include,
   wants them);
2. name rules (user's force-exclude and masks, vendored folders, generated names, binary extensions), then
   count the detected file types and settle which are on; type and size rules;
3. read each remaining file once (`filters.read_facts`, cached per file by size and mtime, optionally in
   worker processes) and apply the content rules, ending with the exact-duplicate check;
4. near-duplicates (MinHash), when asked; then secrets (`secrets.py`), last because it is the slowest rule: a
   file with credentials is rejected, or with `secrets = redact` kept as a redacted copy in `scan/redacted/`
   that its record's `file` points to (so training and the scoreboard read the copy);
5. stage 2: per-file loss under the base model (`lossfilter`), when asked;
6. the user's force-includes, then the train/test split.

The runner alone counts reasons, reports progress (`progress(stage, done, total)`) and publishes
`accepted.jsonl`, `rejected.jsonl` and `stats.json` as one set (`results.publish`: a new folder, then one atomic
switch). Links and special files in the sources are rejected with their own reason codes, so every file of
every source is in one list or the other. A cancelled scan (`should_stop()` is checked between steps) or one
that cannot write (a full disk) publishes nothing, so the previous results stand.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from refact_lab.config import ScanSettings, SettingsError, to_dict
from refact_lab.context.index import index_for_scan
from refact_lab.data import filters, languages, results
from refact_lab.data.filters import FileEntry, Facts, RuleContext, first_rejection
from refact_lab.data.sources import SourceStore
from refact_lab.data.split import SplitError, assign_sets
from refact_lab.home import DEFAULT_PROJECT, Home, atomic_write_json, read_json_object

ProgressFn = Callable[[str, int, int], None]
_FACTS_CACHE_VERSION = 3
# Below this many files to read, worker processes cost more to start than they save.
_POOL_MIN_FILES = 8000
_POOL_CHUNK = 400
# More readers than this only contend for the disk and cost their start-up.
_MAX_AUTO_WORKERS = 8


class ScanError(ValueError):
    """The scan cannot run: no sources, a source vanished, a bad file type, another scan running."""


class ScanWriteError(ScanError):
    """The results could not be written (a full disk, a read-only folder); the previous ones are unchanged."""


class ScanCancelled(Exception):
    """The user stopped the scan; nothing was written."""


def human_size(n: float) -> str:
    """Bytes as the CLI and the Scan panel show them: 512 B, 3.4 KiB, 1.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def scan_files(home: Home, project: str = DEFAULT_PROJECT) -> dict[str, Path]:
    """The scan's own files. accepted/rejected/stats are links through the current set: for reading the
    published results use `results` (`read_results` resolves the set once, so its three files agree)."""
    d = home.scan_dir(project)
    return {"dir": d, "accepted": d / results.ACCEPTED, "rejected": d / results.REJECTED, "stats": d / results.STATS,
            "overrides": d / "overrides.json", "facts": d / "facts_cache.json", "loss_cache": d / "loss_cache",
            "status": d / "status.json", "stop": d / "stop", "lock": d / ".scan.lock", "redacted": d / "redacted"}


# --- user overrides: force-include, force-exclude, per-file test marks ---------------------------------

def load_overrides(home: Home, project: str = DEFAULT_PROJECT) -> dict[str, list[str]]:
    """The user's per-file decisions; ValueError naming the file when it is damaged (they are never silently
    dropped: the next scan would undo them)."""
    path = scan_files(home, project)["overrides"]
    data = read_json_object(path)
    out = {}
    for k in ("include", "exclude", "test"):
        keys = data.get(k, [])
        if not isinstance(keys, list) or not all(isinstance(x, str) for x in keys):
            raise ValueError(f"{path} is damaged: {k}: expected a list of file keys")
        out[k] = sorted(set(keys))
    return out


def set_override(home: Home, project: str, key: str, *, include: bool | None = None, exclude: bool | None = None,
                 test: bool | None = None) -> dict[str, list[str]]:
    """Change the overrides of one file ("source_id/path"). Include and exclude exclude each other."""
    ov = load_overrides(home, project)
    sets = {k: set(v) for k, v in ov.items()}
    for name, value in (("include", include), ("exclude", exclude), ("test", test)):
        if value is True:
            sets[name].add(key)
            if name in ("include", "exclude"):
                sets["exclude" if name == "include" else "include"].discard(key)
        elif value is False:
            sets[name].discard(key)
    out = {k: sorted(v) for k, v in sets.items()}
    atomic_write_json(scan_files(home, project)["overrides"], out)
    return out


# --- results ------------------------------------------------------------------------------------------

def load_results(home: Home, project: str = DEFAULT_PROJECT) -> tuple[list[dict], list[dict], dict | None]:
    """(accepted, rejected, stats) of the last finished scan; empty lists and None before the first."""
    res = results.read_results(home, project)
    return res.accepted, res.rejected, res.stats


def source_names(sources: list) -> dict[str, str]:
    """Source id -> the name people know it by; two sources of the same name are told apart by origin."""
    counts = Counter(s.name for s in sources)
    return {s.id: s.name if counts[s.name] == 1 else f"{s.name} ({s.origin})" for s in sources}


def source_state(source) -> dict:
    """What a scan saw of a source: if any of it changes, the published results are stale."""
    return {"test": source.test, "commit": source.commit, "archive_sha256": source.archive_sha256,
            "updated_at": source.updated_at}


def overrides_digest(overrides: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:16]


def resolve_types(wanted: list[str] | None, counts: Counter) -> list[str]:
    """The file types that are on: the user's (names matched case-insensitively), or automatically the most
    common programming language found (else the most common known type)."""
    if wanted:
        by_lower = {name.lower(): name for name in languages.LANGUAGES}
        out = []
        for w in wanted:
            name = by_lower.get(w.strip().lower())
            if name is None:
                raise ScanError(f"unknown file type {w!r}; known types include "
                                f"{', '.join(sorted(counts) or languages.LANGUAGES[:10])}")
            out.append(name)
        return sorted(set(out))
    ranked = sorted(((-n, lang) for lang, n in counts.items() if lang != "unknown"))
    code = [lang for _, lang in ranked if languages.category(lang) == languages.PROGRAMMING]
    if code:
        return [code[0]]
    return [ranked[0][1]] if ranked else []


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One scan per project at a time, across processes (the app, a notebook, the CLI)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
    except OSError as e:  # a full disk or a read-only state directory: one line, not a traceback
        raise ScanWriteError(f"cannot write in {lock_path.parent}: {e.strerror or e}") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScanError("another scan of this project is running; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- the facts cache (stage 1 incremental) ------------------------------------------------------------

def _load_facts_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("v") != _FACTS_CACHE_VERSION:
        return {}
    return data.get("files", {})


def _write_cache(path: Path, text: str) -> None:
    """Temp file + rename like every state file, but without fsync: a cache lost in a crash is only rebuilt
    (a torn one fails to parse and is ignored), and the fsync would cost more than a small scan."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_head(file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(256)
    except OSError:
        return b""


class _ReaderPool:
    """The reader processes, started while the tree is still being listed: a spawned process takes about as long
    to start and import as listing 20,000 files, so started at the first read it would spend that part of the
    reading starting up. Started once the listing passes _POOL_MIN_FILES (a smaller scan never spawns one)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def warm(self) -> None:
        if self.pool is not None or self.workers <= 1:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the scan runs in a thread of a kernel that may hold other threads and locks
        self.pool = ProcessPoolExecutor(max_workers=self.workers - 1, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(self.workers - 1):
            self.pool.submit(filters.read_facts_batch, [])   # starts the processes and imports the rules now

    def close(self) -> None:
        if self.pool is not None:
            # not waiting: an unused pool may still be starting (a re-scan that read nothing need not wait)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def _read_facts_all(jobs: list[tuple[str, int, int]], workers: int, report: ProgressFn,
                    stop: Callable[[], bool], readers: _ReaderPool | None = None) -> list[Facts]:
    total = len(jobs)
    if workers <= 1 or total < _POOL_MIN_FILES:
        out = []
        read = filters.read_facts
        for k, job in enumerate(jobs):
            if k % 512 == 0:
                report("reading", k, total)
                if stop():
                    raise ScanCancelled()
            out.append(read(*job))
        return out
    readers = readers if readers is not None and readers.workers == workers else _ReaderPool(workers)
    readers.warm()
    pool = readers.pool
    chunks = [jobs[i:i + _POOL_CHUNK] for i in range(0, total, _POOL_CHUNK)]
    parts: list = [None] * len(chunks)
    done = 0
    # The main process is one of the `workers` readers: it reads chunks from the end while the others read from
    # the front, taking only chunks no worker has started, so no core waits on another.
    try:
        futures = [pool.submit(filters.read_facts_batch, c) for c in chunks]
        try:
            for k in range(len(chunks) - 1, -1, -1):
                if not futures[k].cancel():
                    break
                parts[k] = filters.read_facts_batch(chunks[k])
                done += len(chunks[k])
                report("reading", done, total)
                if stop():
                    raise ScanCancelled()
            for k, fut in enumerate(futures):
                if parts[k] is None:
                    parts[k] = [Facts(*f) for f in fut.result()]
                    done += len(chunks[k])
                    report("reading", done, total)
                    if stop():
                        raise ScanCancelled()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    finally:
        readers.close()
    return [f for part in parts for f in part]


def _cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _auto_workers(settings: ScanSettings, n: int) -> int:
    """Reader processes, the main one included: one per core the process may use for a large scan, one for a
    small one (see bench/scan.py and its README row for what two readers gain on a 2-core machine)."""
    if settings.workers:
        return settings.workers
    return min(_MAX_AUTO_WORKERS, _cores()) if n >= _POOL_MIN_FILES else 1


# --- secrets (after every other stage-1 rule) -----------------------------------------------------------

def _text_of(e: FileEntry) -> tuple[str, str]:
    """(sha256, path) of the text training will read: the redacted copy when there is one."""
    return (e.redacted["sha256"], e.redacted["file"]) if e.redacted else (e.facts.sha256, e.file)


def _check_secrets(entries: list[FileEntry], verdicts: list, ctx: RuleContext, mode: str, folder: Path,
                   report: ProgressFn, stop: Callable[[], bool]) -> dict:
    """Apply `filters.secret` to every file still kept; store redacted copies (content-addressed, so an
    unchanged file is written once). Returns the stats entry: counts and seconds, never a secret."""
    from refact_lab.data.secrets import SecretScanner

    started = time.perf_counter()
    keep = [i for i, v in enumerate(verdicts) if v is None]
    flagged = redacted = 0
    cache_path = folder.parent / "secrets_cache.json"
    with SecretScanner() as scanner:
        tag = scanner.version
        try:
            old = json.loads(cache_path.read_text(encoding="utf-8"))
            ctx.secret_cache = dict(old["files"]) if old.get("v") == tag else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ctx.secret_cache = {}
        ctx.secret_scanner, ctx.secrets_mode = scanner, mode
        try:
            for k, i in enumerate(keep):
                if k % 64 == 0:
                    report("secrets", k, len(keep))
                    if stop():
                        raise ScanCancelled()
                e = entries[i]
                verdict = filters.secret(e, ctx)
                if verdict is not None:
                    flagged += verdict[0] == filters.SECRET
                    if e.forced and verdict[0] == filters.SECRET:
                        verdict = (verdict[0], verdict[1] + " (force-include ignored: secrets are never trained on)")
                    verdicts[i] = verdict
                elif e.redaction is not None:
                    flagged += 1
                    redacted += 1
                    e.redacted = _store_redacted(folder, e.redaction)
                    e.redaction = None   # the text (and the values in memory) go now
        finally:
            ctx.secret_scanner = None
        lines, scanned = scanner.lines_checked, scanner.files_scanned
    # Only this scan's files are kept, so the cache never outgrows the sources.
    used = {filters.secret_cache_key(entries[i]) for i in keep}
    with contextlib.suppress(OSError):
        _write_cache(cache_path, json.dumps({"v": tag, "files": {k: v for k, v in ctx.secret_cache.items()
                                                                 if k in used}}, separators=(",", ":")))
    report("secrets", len(keep), len(keep))
    return {"mode": mode, "files_checked": len(keep), "files_with_secrets": flagged, "redacted": redacted,
            "from_cache": len(keep) - scanned, "lines_to_detector": lines, "seconds": round(time.perf_counter() - started, 3)}


def _store_redacted(folder: Path, report) -> dict:
    import hashlib

    data = report.redacted.encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    path = folder / f"{sha}.txt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _write_cache(path, report.redacted)
        except OSError as e:
            raise ScanWriteError(f"cannot write a redacted copy in {folder}: {e.strerror or e}; the previous "
                                 "results are unchanged") from None
    return {"file": str(path), "sha256": sha, "secrets": len(report.findings), "detail": report.describe()}


def _prune_redacted(home: Home, project: str, folder: Path) -> None:
    """Delete redacted copies no kept result set points to (the current one and the previous, which
    results.publish keeps for readers that resolved it just before the switch)."""
    if not folder.is_dir():
        return
    from refact_lab.home import read_jsonl

    used = set()
    for accepted in (home.scan_dir(project) / results.SETS).glob(f"*/{results.ACCEPTED}"):
        used.update(r.get("file") for r in read_jsonl(accepted) if r.get("redacted"))
    for p in folder.glob("*.txt"):
        if str(p) not in used:
            with contextlib.suppress(OSError):
                p.unlink()


# --- the run ------------------------------------------------------------------------------------------

def run_scan(home: Home, project: str = DEFAULT_PROJECT, settings: ScanSettings | None = None, *,
             progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Scan every source of the project; write the logs; return the stats (also in stats.json)."""
    settings = settings or ScanSettings()
    report = progress or (lambda stage, done, total: None)
    stop = should_stop or (lambda: False)
    started = time.perf_counter()
    store = SourceStore(home, project, max_member_bytes=settings.max_file_kib * 1024)
    sources = store.list()
    if not sources:
        raise ScanError("no sources to scan: add a git repository, an archive, files or a folder first")
    paths = scan_files(home, project)
    readers = _ReaderPool(_auto_workers(settings, _POOL_MIN_FILES))
    with _exclusive(paths["lock"]), contextlib.closing(readers):
        overrides = load_overrides(home, project)
        forced_in, test_keys = set(overrides["include"]), set(overrides["test"])
        # An archive is extracted without its members over the file size limit of the time: extract it again
        # when this scan's limit is higher, or the user force-included one of those members.
        for k, src in enumerate(sources):
            if src.kind == "archive":
                forced = frozenset(key.partition("/")[2] for key in forced_in if key.startswith(src.id + "/"))
                try:
                    sources[k] = store.extract_left_out(src, forced)
                except ValueError as e:
                    raise ScanError(str(e)) from None   # the archive errors name the archive

        # 1. list
        entries: list[FileEntry] = []
        not_files: list[tuple[object, str, str, str]] = []   # (source, path, reason, detail): links, FIFOs
        per_source = Counter()
        for src in sources:
            skipped: list = []
            try:
                for rel, file, size, mtime in store.files(src, skipped):
                    key = f"{src.id}/{rel}"
                    entries.append(FileEntry(src.id, rel, file, size, mtime, test=src.test or key in test_keys,
                                             forced=key in forced_in))
                    per_source[src.id] += 1
                    if len(entries) == _POOL_MIN_FILES:
                        readers.warm()
            except ValueError as e:
                raise ScanError(str(e)) from None
            not_files.extend((src, rel, reason, detail) for rel, reason, detail in skipped)
            per_source[src.id] += len(skipped)
            report("listing", len(entries), 0)
            if stop():
                raise ScanCancelled()
        # Held-out files first: of two identical files the test copy is kept, so the test set stays as the
        # user defined it and no training file duplicates it.
        rank = {s.id: i for i, s in enumerate(sources)}
        entries.sort(key=lambda e: (not e.test, rank[e.source], e.path))
        name_language = languages.language_from_name
        for e in entries:
            e.language = name_language(e.path)

        # 2. name rules, type selection, size
        ctx = RuleContext.from_settings(settings)
        names = source_names(sources)
        ctx.source_names = names
        ctx.force_exclude = frozenset(overrides["exclude"])
        verdicts: list = [first_rejection(filters.NAME_RULES, e, ctx) for e in entries]
        for e, v in zip(entries, verdicts):
            # Only a file without an extension can be named by its #! line; read its first bytes now, after
            # the name rules, so scripts in vendored folders are never opened.
            if v is None and e.language is None and languages.needs_shebang(e.path):
                e.language = languages.language_from_shebang(_read_head(e.file).split(b"\n", 1)[0])
        type_counts = Counter(e.language or "unknown" for e, v in zip(entries, verdicts) if v is None)
        types_on = resolve_types(settings.file_types, type_counts)
        ctx.types_on = frozenset(types_on)
        for i, e in enumerate(entries):
            if verdicts[i] is None:
                verdicts[i] = first_rejection(filters.SELECT_RULES, e, ctx)
        report("rules", len(entries), len(entries))

        # 3. read once, content rules
        cache_old = _load_facts_cache(paths["facts"])
        cache_new: dict = {}
        to_read: list[int] = []
        for i, e in enumerate(entries):
            if verdicts[i] is not None and not (e.forced and verdicts[i][0] != filters.FORCED_EXCLUDE):
                continue
            hit = cache_old.get(e.file)
            if hit and hit[0] == e.size and hit[1] == e.mtime_ns and (e.forced or hit[3] <= ctx.max_bytes + 1):
                e.facts = Facts(*hit[2:])
                cache_new[e.file] = hit
            else:
                to_read.append(i)
        # A force-included file is read whole even when it is over the size limit.
        jobs = [(entries[i].file, max(ctx.max_bytes, entries[i].size) if entries[i].forced else ctx.max_bytes,
                 entries[i].size) for i in to_read]
        workers = _auto_workers(settings, len(jobs))
        for i, facts in zip(to_read, _read_facts_all(jobs, workers, report, stop, readers)):
            e = entries[i]
            e.facts = facts
            if not facts.error:
                cache_new[e.file] = [e.size, e.mtime_ns, *facts]
        report("reading", len(jobs), len(jobs))
        overridden: dict[int, tuple[str, str]] = {}
        for i, e in enumerate(entries):
            if e.facts is None:
                continue
            content = first_rejection(filters.CONTENT_RULES, e, ctx)
            if e.forced:
                verdict = verdicts[i] or content
                if verdict is not None:
                    if e.facts.error or e.facts.binary:
                        verdicts[i] = (verdict[0], verdict[1] + " (force-include ignored: not readable text)")
                        continue
                    overridden[i] = verdict
                verdicts[i] = None
            else:
                verdicts[i] = content
        if stop():
            raise ScanCancelled()

        # 4. near-duplicates
        if settings.near_dup:
            from refact_lab.data.dedup import NearDupIndex

            ctx.near_index = NearDupIndex(settings.near_dup_threshold)
            keep = [i for i, v in enumerate(verdicts) if v is None and not entries[i].forced]
            for k, i in enumerate(keep):
                e = entries[i]
                try:
                    with open(e.file, "rb") as f:
                        e.sketch = ctx.near_index.sketch(f.read(ctx.max_bytes + 1))
                except OSError:
                    e.sketch = None
                verdicts[i] = first_rejection([filters.near_duplicate], e, ctx)
                e.sketch = None  # the index keeps what it needs; entries stay small
                if k % 256 == 0:
                    report("near-duplicates", k, len(keep))
                    if stop():
                        raise ScanCancelled()

        # 4b. secrets
        secret_info = None
        if settings.secrets != "off":
            secret_info = _check_secrets(entries, verdicts, ctx, settings.secrets, paths["redacted"], report, stop)

        # 5. stage 2: loss
        loss_info = None
        if settings.lm_filter:
            from refact_lab.data.lossfilter import compute_losses

            survivors = [i for i, v in enumerate(verdicts) if v is None]
            items = [_text_of(entries[i]) for i in survivors]
            # No model named: the one the workbench serves (settings.json), else the embedded default.
            from refact_lab.serve.state import active_model

            model = settings.model or active_model(home)
            losses, loss_info = compute_losses(
                items, model=model, cache_dir=paths["loss_cache"], batch_size=settings.lm_batch_size,
                max_tokens=settings.lm_max_tokens, progress=lambda d, t: report("loss", d, t), should_stop=stop)
            if stop():
                raise ScanCancelled()
            # "auto" threshold: what the registry says suits this model (a small model's losses run higher).
            if settings.loss_threshold is None:
                ctx.loss_threshold = loss_info["model_threshold"]
            loss_info["threshold"] = ctx.loss_threshold
            loss_info["threshold_auto"] = settings.loss_threshold is None
            for i in survivors:
                e = entries[i]
                e.loss, e.loss_error = losses.get(_text_of(e)[0], (None, "not computed"))
                verdict = first_rejection(filters.LOSS_RULES, e, ctx)
                if verdict is not None and e.forced:
                    overridden.setdefault(i, verdict)
                else:
                    verdicts[i] = verdict

        # 6. records, split, write
        accepted, rejected = [], []
        for i, e in enumerate(entries):
            rec = {"source": e.source, "source_name": names[e.source], "path": e.path, "file": e.file, "size": e.size,
                   "sha256": e.facts.sha256 if e.facts else None, "language": e.language,
                   "set": "test" if e.test else "train", "loss": None if e.loss is None else round(e.loss, 4)}
            if verdicts[i] is None:
                if e.redacted:   # training reads the redacted copy; the original's hash stays for reference
                    rec.update(file=e.redacted["file"], sha256=e.redacted["sha256"], redacted={
                        "secrets": e.redacted["secrets"], "detail": e.redacted["detail"],
                        "source_sha256": e.facts.sha256})
                rec["held_out"] = e.test
                if e.forced:
                    rec["forced"] = True
                    if i in overridden:
                        rec["overridden"] = {"reason": overridden[i][0], "detail": overridden[i][1]}
                accepted.append(rec)
            else:
                rec["reason"], rec["detail"] = verdicts[i]
                rejected.append(rec)
        for src, rel, reason, detail in not_files:
            rejected.append({"source": src.id, "source_name": names[src.id], "path": rel,
                             "file": os.path.join(src.root, rel), "size": 0, "sha256": None, "language": None,
                             "set": "test" if src.test else "train", "loss": None, "reason": reason,
                             "detail": detail})
        split_error = split_warning = None
        try:
            split_warning = assign_sets(accepted, test_share=settings.test_share,
                                        max_test_files=settings.max_test_files, seed=settings.seed)
        except SplitError as e:
            split_error = str(e)
        for rec in accepted:
            rec.pop("held_out", None)
        report("writing", 0, 1)

        reasons = Counter(r["reason"] for r in rejected)
        sets = {name: {"files": sum(1 for r in accepted if r["set"] == name),
                       "bytes": sum(r["size"] for r in accepted if r["set"] == name)} for name in ("train", "test")}
        stats = {
            "project": project,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "settings": to_dict(settings),
            "sources": [{"id": s.id, "kind": s.kind, "name": s.name, "display_name": names[s.id],
                         "origin": s.origin, "test": s.test, "commit": s.commit, "files": per_source[s.id],
                         "state": source_state(s)} for s in sources],
            "overrides_digest": overrides_digest(overrides),
            "files": len(entries) + len(not_files),   # = accepted + rejected: links and FIFOs count too
            "accepted": len(accepted),
            "rejected": len(rejected),
            "reasons": {code: reasons[code] for code in filters.REASONS if reasons[code]},
            "train": sets["train"],
            "test": sets["test"],
            "types": dict(type_counts.most_common()),
            "types_on": types_on,
            "accepted_languages": dict(Counter(r["language"] for r in accepted).most_common()),
            "files_read": len(jobs),
            "files_cached": sum(1 for e in entries if e.facts is not None) - len(jobs),
            "workers": workers,
            "loss": loss_info,
            "secrets": secret_info,
            # the threshold stage 2 applied (the model's own under "auto"); None when stage 2 was off
            "loss_threshold": loss_info["threshold"] if loss_info else None,
            "split_error": split_error,
            "split_warning": split_warning,
        }
        # The retrieval index of the accepted files, for repository context in completions (incremental: only
        # changed files are chunked again); its build time and size are part of the scan's stats.
        report("index", 0, 1)
        stats["index"] = index_for_scan(home, project, accepted)
        # ASCII escapes: a file name that is not UTF-8 (a lone surrogate in Python) still writes as valid JSON.
        enc = json.JSONEncoder().encode
        try:
            results.publish(home, project, {
                results.ACCEPTED: "".join(enc(r) + "\n" for r in accepted),
                results.REJECTED: "".join(enc(r) + "\n" for r in rejected),
                results.STATS: json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n"})
        except OSError as e:
            raise ScanWriteError(f"cannot write the scan results in {paths['dir']}: {e.strerror or e}; the "
                                 "previous results are unchanged") from None
        _prune_redacted(home, project, paths["redacted"])
        try:
            _write_cache(paths["facts"], json.dumps({"v": _FACTS_CACHE_VERSION, "files": cache_new},
                                                    separators=(",", ":")))
        except OSError:
            pass  # only a cache: the next scan reads the files again
        report("done", 1, 1)
        return stats


def settings_from_stats(stats: dict | None) -> ScanSettings:
    """The settings of the last scan (for the form), or defaults if there is none or they no longer parse."""
    from refact_lab.config import from_dict

    try:
        return from_dict(ScanSettings, (stats or {}).get("settings") or {})
    except (SettingsError, TypeError):
        return ScanSettings()
