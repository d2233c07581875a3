"""Retrieval latency of the repository-context index on a 10,000-file project, and its build times and size.

The project is real code: the Python standard library's files, copied under renamed paths (copy3/json/
decoder.py ...) until there are N files, each copy with a line of its own so no two files have the same content
(as after the scan's dedup: the index would otherwise chunk a content once). It builds the index as the scan does
(`build_index`: tree-sitter definition chunks, BM25 terms, the bm25s matrix), then changes 1% of the files and
builds again (incremental: only those are read, parsed and tokenized; the matrix is computed again from the
stored term ids), then times `retrieve` for cursors at random lines of random files (the code around the cursor
as the query, that file excluded), as the server does for a FIM request.

Baselines, measured in the same run: the full build for the incremental one (the ratio says what reusing the
store saves), and tokenizing the cursor's FIM prompt with the embedded model's tokenizer for retrieval (a cost
every completion already pays; the ratio says how much retrieval adds to preparing a prompt).
Goal: retrieval p50 under 10 ms on this CPU.

    .venv/bin/python bench/retrieval.py [--files 10000] [--queries 300] [--changed 0.01]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refact_lab.context.index import IndexCache, build_index, cursor_query  # noqa: E402
from refact_lab.home import Home  # noqa: E402


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size < 200_000)


def project_records(n: int, folder: Path) -> tuple[list[dict], dict[str, str]]:
    """N scan records of distinct files written under `folder`."""
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    records, texts = [], {}
    for i in range(n):
        src = files[i % len(files)]
        path = f"copy{i // len(files)}/{src.relative_to(root).as_posix()}"
        text = src.read_text(encoding="utf-8", errors="replace") + f"\n# {path}\n"
        records.append(write(folder / path, path, text))
        texts[path] = text
    return records, texts


def write(file: Path, path: str, text: str) -> dict:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text, encoding="utf-8")
    return {"path": path, "file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--changed", type=float, default=0.01, help="share of the files changed before the rebuild")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        records, texts = project_records(args.files, Path(tmp) / "project")
        print(f"project: {len(records)} files, {sum(len(t) for t in texts.values()) / 2**20:.0f} MiB of Python "
              f"(the standard library, copied under renamed paths)")
        home = Home.resolve(Path(tmp) / "home").ensure()
        full = build_index(home, "bench", records)
        print(f"full build: {full['build_s']:.1f} s ({full['chunk_s']:.1f} s reading, chunking, tokenizing "
              f"{full['chunked_files']} files), {full['chunks']} chunks, {full['bytes'] / 2**20:.0f} MiB on disk")
        # change 1% of the files: a line added to each, as a commit touching a few files would
        rng = random.Random(1)
        changed = list(records)
        for i in rng.sample(range(len(records)), max(1, round(len(records) * args.changed))):
            r = records[i]
            texts[r["path"]] += "\n\ndef bench_changed_marker():\n    return 1\n"
            changed[i] = write(Path(r["file"]), r["path"], texts[r["path"]])
        inc = build_index(home, "bench", changed)
        print(f"incremental rebuild ({inc['chunked_files']} files changed): {inc['build_s']:.1f} s "
              f"({inc['chunk_s']:.2f} s reading the store and chunking the changed files, {inc['reused_files']} "
              f"files reused; the rest is the BM25 matrix and writing it); full / incremental = "
              f"{full['build_s'] / inc['build_s']:.1f}x")
        print(f"index size: {inc['bytes'] / 2**20:.0f} MiB on disk, of which {inc['store_bytes'] / 2**20:.0f} MiB "
              f"the store (chunks and term counts by content, for this build and the previous one)")
        t = time.perf_counter()
        index = IndexCache(home).get("bench")
        print(f"load: {time.perf_counter() - t:.2f} s")
        hit = index.retrieve("bench_changed_marker()", k=1)
        assert hit and "bench_changed_marker" in hit[0].text, "the rebuild lost the changed files' new content"

        from transformers import AutoTokenizer

        from refact_lab.models.prompt import build_fim_ids
        from refact_lab.models.registry import QWEN_FIM, resolve

        tok = AutoTokenizer.from_pretrained(resolve(None).source)
        rng = random.Random(0)
        paths = list(texts)
        retrieval, encode, found = [], [], 0
        for _ in range(args.queries):
            path = rng.choice(paths)
            lines = texts[path].splitlines(keepends=True)
            cut = rng.randint(1, max(len(lines) - 1, 1))
            prefix, suffix = "".join(lines[:cut]), "".join(lines[cut:])
            t = time.perf_counter()
            snippets = index.retrieve(cursor_query(prefix, suffix), exclude_path=path, k=4, token_budget=1024)
            retrieval.append(time.perf_counter() - t)
            found += bool(snippets)
            assert all(s.path != path for s in snippets)
            t = time.perf_counter()
            build_fim_ids(tok, QWEN_FIM, prefix[-8000:], suffix[:2000], max_prompt_tokens=2048)
            encode.append(time.perf_counter() - t)
        p50, p95 = pct(retrieval, 50) * 1e3, pct(retrieval, 95) * 1e3
        e50 = pct(encode, 50) * 1e3
        print(f"retrieve: p50 {p50:.1f} ms, p95 {p95:.1f} ms over {args.queries} cursors "
              f"({found} got snippets); goal p50 < 10 ms: {'met' if p50 < 10 else 'NOT met'}")
        print(f"baseline, tokenizing the cursor's FIM prompt: p50 {e50:.1f} ms; retrieval / tokenizing = {p50 / e50:.2f}x")


if __name__ == "__main__":
    main()
