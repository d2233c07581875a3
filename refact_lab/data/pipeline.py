"""The scan runner: every file of every source ends in accepted.jsonl or rejected.jsonl, with a reason.

Stages, in order (each stage only sees what the previous kept, so cheap checks protect expensive ones):

1. list the sources' files (one lstat each) and name their languages;
2. name rules (user's force-exclude and masks, vendored folders, generated names, binary extensions), then
   count the detected file types and settle which are on; type and size rules;
3. read each remaining file once (`filters.read_facts`, cached per file by size and mtime, optionally in
   worker processes) and apply the content rules, ending with the exact-duplicate check;
4. near-duplicates (MinHash), when asked;
5. stage 2: per-file loss under the base model (`lossfilter`), when asked;
6. the user's force-includes, then the train/test split.

The runner alone counts reasons, reports progress (`progress(stage, done, total)`) and writes
`projects/<p>/scan/accepted.jsonl`, `rejected.jsonl` and `stats.json`, each atomically, stats last. A
cancelled scan (`should_stop()` is checked between steps) writes nothing, so the previous results stand.
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
from refact_lab.data import filters, languages
from refact_lab.data.filters import FileEntry, Facts, RuleContext, first_rejection
from refact_lab.data.sources import SourceStore
from refact_lab.data.split import SplitError, assign_sets
from refact_lab.home import DEFAULT_PROJECT, Home, atomic_write_json, atomic_write_text, read_json, read_jsonl

ProgressFn = Callable[[str, int, int], None]
_FACTS_CACHE_VERSION = 3
# Below this many files to read, worker processes cost more to start than they save.
_POOL_MIN_FILES = 8000
_POOL_CHUNK = 400


class ScanError(ValueError):
    """The scan cannot run: no sources, a source vanished, a bad file type, another scan running."""


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
    d = home.scan_dir(project)
    return {"dir": d, "accepted": d / "accepted.jsonl", "rejected": d / "rejected.jsonl", "stats": d / "stats.json",
            "overrides": d / "overrides.json", "facts": d / "facts_cache.json", "loss_cache": d / "loss_cache",
            "status": d / "status.json", "stop": d / "stop", "lock": d / ".scan.lock"}


# --- user overrides: force-include, force-exclude, per-file test marks ---------------------------------

def load_overrides(home: Home, project: str = DEFAULT_PROJECT) -> dict[str, list[str]]:
    data = read_json(scan_files(home, project)["overrides"], {}) or {}
    return {k: sorted(set(data.get(k, []))) for k in ("include", "exclude", "test")}


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
    paths = scan_files(home, project)
    return read_jsonl(paths["accepted"]), read_jsonl(paths["rejected"]), read_json(paths["stats"])


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
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
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
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_head(file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(256)
    except OSError:
        return b""


def _read_facts_all(jobs: list[tuple[str, int]], workers: int, report: ProgressFn,
                    stop: Callable[[], bool]) -> list[Facts]:
    total = len(jobs)
    if workers <= 1 or total < _POOL_MIN_FILES:
        out = []
        read = filters.read_facts
        for k, (file, limit) in enumerate(jobs):
            if k % 512 == 0:
                report("reading", k, total)
                if stop():
                    raise ScanCancelled()
            out.append(read(file, limit))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the scan runs in a thread of a kernel that may hold other threads and locks.
    chunks = [jobs[i:i + _POOL_CHUNK] for i in range(0, total, _POOL_CHUNK)]
    out = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(filters.read_facts_batch, chunks):
            out.extend(Facts(*f) for f in part)
            report("reading", len(out), total)
            if stop():
                pool.shutdown(cancel_futures=True)
                raise ScanCancelled()
    return out


def _auto_workers(settings: ScanSettings, n: int) -> int:
    """Reader processes. Measured on a shared 2-core machine, two workers were slower than one (the main
    process lists and judges files meanwhile, and the cores are busy), so auto uses a pool only with cores
    to spare and many files to read."""
    if settings.workers:
        return settings.workers
    cores = os.cpu_count() or 1
    return min(4, cores // 2) if cores >= 4 and n >= _POOL_MIN_FILES else 1


# --- the run ------------------------------------------------------------------------------------------

def run_scan(home: Home, project: str = DEFAULT_PROJECT, settings: ScanSettings | None = None, *,
             progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Scan every source of the project; write the logs; return the stats (also in stats.json)."""
    settings = settings or ScanSettings()
    report = progress or (lambda stage, done, total: None)
    stop = should_stop or (lambda: False)
    started = time.perf_counter()
    store = SourceStore(home, project)
    sources = store.list()
    if not sources:
        raise ScanError("no sources to scan: add a git repository, an archive, files or a folder first")
    paths = scan_files(home, project)
    with _exclusive(paths["lock"]):
        overrides = load_overrides(home, project)
        forced_in, test_keys = set(overrides["include"]), set(overrides["test"])

        # 1. list
        entries: list[FileEntry] = []
        per_source = Counter()
        for src in sources:
            try:
                for rel, file, size, mtime in store.files(src):
                    key = f"{src.id}/{rel}"
                    entries.append(FileEntry(src.id, rel, file, size, mtime, test=src.test or key in test_keys,
                                             forced=key in forced_in))
                    per_source[src.id] += 1
            except ValueError as e:
                raise ScanError(str(e)) from None
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
        jobs = [(entries[i].file, max(ctx.max_bytes, entries[i].size) if entries[i].forced else ctx.max_bytes)
                for i in to_read]
        workers = _auto_workers(settings, len(jobs))
        for i, facts in zip(to_read, _read_facts_all(jobs, workers, report, stop)):
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

        # 5. stage 2: loss
        loss_info = None
        if settings.lm_filter:
            from refact_lab.data.lossfilter import compute_losses

            survivors = [i for i, v in enumerate(verdicts) if v is None]
            items = [(entries[i].facts.sha256, entries[i].file) for i in survivors]
            # No model named: the one the workbench serves (settings.json), else the embedded default.
            model = settings.model or home.load_settings().get("model")
            losses, loss_info = compute_losses(
                items, model=model, cache_dir=paths["loss_cache"], batch_size=settings.lm_batch_size,
                max_tokens=settings.lm_max_tokens, progress=lambda d, t: report("loss", d, t), should_stop=stop)
            if stop():
                raise ScanCancelled()
            # "auto" threshold: what the registry says suits this model (a small model's losses run higher).
            if settings.loss_threshold is None:
                ctx.loss_threshold = loss_info["model_threshold"]
            loss_info["threshold"] = ctx.loss_threshold
            for i in survivors:
                e = entries[i]
                e.loss, e.loss_error = losses.get(e.facts.sha256, (None, "not computed"))
                verdict = first_rejection(filters.LOSS_RULES, e, ctx)
                if verdict is not None and e.forced:
                    overridden.setdefault(i, verdict)
                else:
                    verdicts[i] = verdict

        # 6. records, split, write
        accepted, rejected = [], []
        for i, e in enumerate(entries):
            rec = {"source": e.source, "path": e.path, "file": e.file, "size": e.size,
                   "sha256": e.facts.sha256 if e.facts else None, "language": e.language,
                   "set": "test" if e.test else "train", "loss": None if e.loss is None else round(e.loss, 4)}
            if verdicts[i] is None:
                rec["held_out"] = e.test
                if e.forced:
                    rec["forced"] = True
                    if i in overridden:
                        rec["overridden"] = {"reason": overridden[i][0], "detail": overridden[i][1]}
                accepted.append(rec)
            else:
                rec["reason"], rec["detail"] = verdicts[i]
                rejected.append(rec)
        split_error = None
        try:
            assign_sets(accepted, test_share=settings.test_share, max_test_files=settings.max_test_files,
                        seed=settings.seed)
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
            "sources": [{"id": s.id, "kind": s.kind, "name": s.name, "origin": s.origin, "test": s.test,
                         "commit": s.commit, "files": per_source[s.id]} for s in sources],
            "files": len(entries),
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
            "split_error": split_error,
        }
        # ASCII escapes: a file name that is not UTF-8 (a lone surrogate in Python) still writes as valid JSON.
        enc = json.JSONEncoder().encode
        atomic_write_text(paths["accepted"], "".join(enc(r) + "\n" for r in accepted))
        atomic_write_text(paths["rejected"], "".join(enc(r) + "\n" for r in rejected))
        _write_cache(paths["facts"], json.dumps({"v": _FACTS_CACHE_VERSION, "files": cache_new},
                                                separators=(",", ":")))
        atomic_write_json(paths["stats"], stats)
        report("done", 1, 1)
        return stats


def settings_from_stats(stats: dict | None) -> ScanSettings:
    """The settings of the last scan (for the form), or defaults if there is none or they no longer parse."""
    from refact_lab.config import from_dict

    try:
        return from_dict(ScanSettings, (stats or {}).get("settings") or {})
    except (SettingsError, TypeError):
        return ScanSettings()
