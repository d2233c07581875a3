"""Benchmark: stage 1 of the scan over a large real tree, against a floor measured in the same run.

The tree is the running interpreter's standard library plus its site-packages (tens of thousands of real
files: code, vendored copies, generated files, binaries). The floor is the least any scanner must do: list
the tree and read every file once, hashing it with sha256. Our time is a full stage-1 scan (all rules,
dedup, writing accepted.jsonl / rejected.jsonl / stats.json) into a fresh state directory, so no cache helps.

    .venv/bin/python bench/scan.py [--repeat 2] [--workers N] [ROOT ...]

Prints files/s and MB/s for both and the ratio ours / floor (goal: at most 2.0). The page cache is warmed
first so both sides read from memory; the best of `--repeat` runs is kept for each side. A scan does more than
stage 1: the secrets rule (on by default) and the retrieval index of the accepted files. The bench times them
apart (the progress callback marks the secrets stage; the index hook is timed around its call) and prints the
ratio of stage 1 alone (listing, rules, reading, content rules, writing the results) and of stage 1 with the
secrets rule. A second, code-heavy tree (only the .py files of the first, every one of them read unless
vendored or too large) shows the cost of the content rules without the savings of rejecting binaries and
caches by name.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import site
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refact_lab.config import ScanSettings  # noqa: E402
from refact_lab.data import pipeline  # noqa: E402
from refact_lab.data.pipeline import run_scan  # noqa: E402
from refact_lab.data.sources import SourceStore  # noqa: E402
from refact_lab.home import Home  # noqa: E402


def default_roots() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])] + [Path(p) for p in site.getsitepackages()]
    out: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r.is_dir() and not any(r == o or o in r.parents for o in out):
            out.append(r)
    return out


def floor(roots: list[Path]) -> tuple[float, int, int]:
    """List every file (no symlinks, no VCS folders, like the scan) and read + sha256 each one once."""
    t = time.perf_counter()
    files = size = 0
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".git", ".hg", ".svn", ".bzr")]
            for name in names:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                hashlib.sha256(data).hexdigest()
                files += 1
                size += len(data)
    return time.perf_counter() - t, files, size


_index_seconds: list[float] = []
_index_for_scan = pipeline.index_for_scan


def _timed_index(*args, **kwargs):
    """The scan's index hook, timed whole: its own build_s leaves part of the call out (about 0.2 s on 20k files)."""
    t = time.perf_counter()
    try:
        return _index_for_scan(*args, **kwargs)
    finally:
        _index_seconds.append(time.perf_counter() - t)


pipeline.index_for_scan = _timed_index


class _Clock:
    """The scan's progress callback: when each stage first reported, so the stages can be timed apart."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: dict[str, float] = {}
        _index_seconds.clear()

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.first.setdefault(stage, time.perf_counter())

    def parts(self, stats: dict) -> dict:
        """Stage 1 (listing, rules, reading, content rules, records, writing the results), the secrets rule
        and the retrieval index, in seconds."""
        end = time.perf_counter()
        at = self.first
        after_secrets = min((at[s] for s in ("loss", "writing") if s in at), default=end)
        secrets = after_secrets - at["secrets"] if "secrets" in at else 0.0
        index = sum(_index_seconds)
        total = end - self.start
        return {"total": total, "secrets": secrets, "index": index, "stage1": total - secrets - index}


def ours(roots: list[Path], workers: int | None) -> tuple[dict, dict, dict]:
    tmp = Path(tempfile.mkdtemp(prefix="refact-lab-bench-"))
    try:
        home = Home.resolve(tmp).ensure()
        store = SourceStore(home)
        for r in roots:
            store.add_folder(r)
        settings = ScanSettings(lm_filter=False, workers=workers)
        clock = _Clock()
        stats = run_scan(home, settings=settings, progress=clock)
        first = clock.parts(stats)
        clock = _Clock()   # nothing changed: every file's facts come from the cache
        again = clock.parts(run_scan(home, settings=settings, progress=clock))
        return first, stats, again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def code_heavy_tree(dest: Path) -> list[Path]:
    """The .py files of the same tree, and nothing else, hard-linked (copied across file systems) into one
    folder: every file is code and is read, so this tree shows the cost of the content rules without the
    savings of rejecting binaries and caches by name."""
    for i, root in enumerate(default_roots()):
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            # Neutral folder names: under "site-packages/" every file would be rejected as vendored.
            if path.is_symlink() or not path.is_file() or rel.parts[0] == "site-packages":
                continue
            target = dest / f"tree{i}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return [dest]


def measure(title: str, roots: list[Path], repeat: int, workers: int | None) -> float:
    print(f"== {title}: {len(roots)} folder(s)" + (f", e.g. {roots[0]}" if roots else ""))
    floor(roots)  # warm the page cache: both sides should read from memory
    floors, runs = [], []
    for _ in range(repeat):
        floors.append(floor(roots))
        runs.append(ours(roots, workers))
    f_time, files, size = min(floors)
    o, stats, again = min(runs, key=lambda r: r[0]["stage1"])
    mb = size / 1e6
    sec = stats.get("secrets") or {}
    print(f"files: {files}  ({mb:.0f} MB)")
    print(f"floor (list + read + sha256): {f_time:6.2f} s  {files / f_time:8.0f} files/s  {mb / f_time:7.0f} MB/s")
    print(f"stage 1 scan (workers={stats['workers']}): {o['stage1']:6.2f} s  {stats['files'] / o['stage1']:8.0f} "
          f"files/s  {mb / o['stage1']:7.0f} MB/s  (read {stats['files_read']} files; the rest were rejected by name "
          f"or size first)")
    print(f"secrets rule:                 {o['secrets']:6.2f} s  ({sec.get('files_checked', 0)} files checked, "
          f"{sec.get('lines_to_detector', 0)} lines to the detector, {sec.get('files_with_secrets', 0)} flagged)")
    print(f"retrieval index (not stage 1): {o['index']:5.2f} s  ({(stats.get('index') or {}).get('chunks', 0)} chunks)")
    print(f"whole scan:                   {o['total']:6.2f} s")
    print(f"re-scan, nothing changed:     {again['total']:6.2f} s  (stage 1 {again['stage1']:.2f} s, secrets "
          f"{again['secrets']:.2f} s, index {again['index']:.2f} s)")
    print(f"accepted {stats['accepted']}, rejected {stats['rejected']}: {stats['reasons']}")
    ratio = o["stage1"] / f_time
    with_secrets = (o["stage1"] + o["secrets"]) / f_time
    print(f"ratio stage 1 / floor: {ratio:.2f}  (goal <= 2.0: {'met' if ratio <= 2.0 else 'NOT met'})")
    print(f"ratio stage 1 with the secrets rule / floor: {with_secrets:.2f}\n")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="*", type=Path, help="folders to scan instead of the two default trees")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="stage-1 reader processes (default: auto)")
    args = ap.parse_args()
    if args.roots:
        measure("given tree", args.roots, args.repeat, args.workers)
        return 0
    measure("standard library + site-packages", default_roots(), args.repeat, args.workers)
    with tempfile.TemporaryDirectory(prefix="refact-lab-bench-code-") as tmp:
        measure("code only: the .py files of the same tree", code_heavy_tree(Path(tmp)), args.repeat, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
