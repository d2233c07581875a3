"""Benchmark: what the secrets rule costs in a stage-1 scan, and how often it flags the standard library.

Both scans run in this process on the same tree, into fresh state directories: stage 1 with `secrets = off`
(the baseline) and with `secrets = reject`. The ratio is reject / off, best of `--repeat` runs each; a second
ratio is for a re-scan of the unchanged tree (the secrets cache answers for unchanged files). The
standard library holds no real credentials, so every file the rule flags there counts as a false positive:
the share is files flagged / files the rule scanned (the .py files that passed every other stage-1 rule),
with the kinds that fired. A third figure is the prefilter's own worth: detect-secrets over every line of
a sample of files, against the prefiltered scan of the same files.

    .venv/bin/python bench/scan_secrets.py [--repeat 2] [--sample 150] [ROOT ...]

ROOT defaults to the system's standard library folders, /usr/lib/python3.*/.
"""

from __future__ import annotations

import argparse
import glob
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refact_lab.config import ScanSettings  # noqa: E402
from refact_lab.data import secrets  # noqa: E402
from refact_lab.data.pipeline import load_results, run_scan  # noqa: E402
from refact_lab.data.sources import SourceStore  # noqa: E402
from refact_lab.home import Home  # noqa: E402


def scan(roots: list[Path], mode: str) -> tuple[float, dict, list[dict], float]:
    """(seconds, stats, files flagged, seconds of a re-scan of the unchanged tree) in a fresh state directory."""
    tmp = Path(tempfile.mkdtemp(prefix="refact-lab-bench-secrets-"))
    try:
        home = Home.resolve(tmp).ensure()
        store = SourceStore(home)
        for r in roots:
            store.add_folder(r)
        t = time.perf_counter()
        settings = ScanSettings(lm_filter=False, file_types=["Python"], secrets=mode)
        stats = run_scan(home, settings=settings)
        elapsed = time.perf_counter() - t
        _, rejected, _ = load_results(home)
        t = time.perf_counter()
        run_scan(home, settings=settings)     # unchanged files: the facts and the secrets caches answer
        return elapsed, stats, [r for r in rejected if r["reason"] == "secret"], time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prefilter_worth(roots: list[Path], n: int) -> tuple[float, float, int, int]:
    """(seconds with the prefilter, seconds checking every line, lines, findings equal?) on n files."""
    files = sorted(p for r in roots for p in r.rglob("*.py") if p.is_file())[:n]
    texts = [(str(p), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    found = []
    times = []
    for check_all in (False, True):
        with secrets.SecretScanner() as s:
            s._check_all = check_all
            t = time.perf_counter()
            found.append([sorted((f.kind, f.line) for f in s.find(text, path)) for path, text in texts])
            times.append(time.perf_counter() - t)
    return times[0], times[1], sum(t.count("\n") for _, t in texts), found[0] == found[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sample", type=int, default=150, help="files for the prefilter comparison")
    args = ap.parse_args()
    roots = args.roots or [Path(p) for p in sorted(glob.glob("/usr/lib/python3.*/")) if Path(p).is_dir()]
    if not roots:
        sys.exit("no standard library folder found; pass ROOT")
    print("roots:", ", ".join(map(str, roots)))
    bases = [scan(roots, "off") for _ in range(args.repeat)]
    base, base_again = min(b[0] for b in bases), min(b[3] for b in bases)
    runs = [scan(roots, "reject") for _ in range(args.repeat)]
    best, stats, flagged, _ = min(runs, key=lambda r: r[0])
    again = min(r[3] for r in runs)
    info = stats["secrets"]
    print(f"stage 1 without the secrets rule: {base:.2f} s; with it: {best:.2f} s "
          f"(rule {info['seconds']:.2f} s, {info['seconds'] / max(1, info['files_checked']) * 1000:.2f} ms per file, "
          f"{stats['train']['bytes'] + stats['test']['bytes'] + sum(r['size'] for r in flagged) >> 20} MiB) "
          f"-> ratio {best / base:.2f}")
    print(f"re-scan of the unchanged tree: {base_again:.2f} s without, {again:.2f} s with -> ratio "
          f"{again / base_again:.2f}")
    share = info["files_with_secrets"] / max(1, info["files_checked"])
    print(f"files the rule scanned: {info['files_checked']}, flagged: {info['files_with_secrets']} "
          f"-> false-positive share {share:.1%}; lines sent to detect-secrets: {info['lines_to_detector']}")
    kinds = Counter(k for r in flagged for k in set(re.findall(r"([A-Za-z][\w ]*?) on line \d+", r["detail"])))
    for kind, n in kinds.most_common():
        print(f"  {kind}: {n} files")
    for r in flagged[:15]:
        print(f"  {r['path']}: {r['detail']}")
    fast, slow, lines, same = prefilter_worth(roots, args.sample)
    print(f"prefilter on {args.sample} files ({lines} lines): {fast:.2f} s vs every line {slow:.2f} s -> "
          f"{slow / fast:.1f}x faster; same findings: {same}")


if __name__ == "__main__":
    main()
