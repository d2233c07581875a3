"""The train/test split of the accepted files: held-out files if the user marked any, else a seeded sample.

The automatic test set is a few files (a share of the dataset, at least one, at most `max_test_files`),
chosen by hashing (seed, content hash, path in its source): the same files and seed give the same split whatever
order the files were listed in, in whichever home and under whichever source id, and adding a file moves at most a
few others. Files of at least 1 KiB (or the median
size, if smaller) are preferred, so the test loss is not measured on stubs. A test file never has the same content
as a training file, or the test loss would measure memorisation.

A test set of a file or two judges the "best" checkpoint on noise, so the automatic set grows past its share
until it holds about MIN_TEST_BYTES (never past a fifth of the files or `max_test_files`); when the test set is
still that small, `assign_sets` returns a warning saying how small, for the stats and the Scan panel.
"""

from __future__ import annotations

import hashlib
from collections import Counter


MIN_TEST_FILE_BYTES = 1024
# About 4,000 tokens of code (~4 bytes a token): below this a test loss moves more with the choice of files
# than with training, and the "best" checkpoint is picked on noise.
MIN_TEST_BYTES = 16 * 1024
BYTES_PER_TOKEN = 4


def small_test_warning(records: list[dict]) -> str | None:
    """A warning when the test set is too small for a stable test loss; None when it is large enough."""
    test = [r for r in records if r.get("set") == "test"]
    size = sum(r.get("size") or 0 for r in test)
    if not test or size >= MIN_TEST_BYTES:
        return None
    return (f"only {len(test)} test file{'' if len(test) == 1 else 's'}, ~{size // BYTES_PER_TOKEN:,} tokens: "
            f"the test loss will be noisy and the best checkpoint picked on noise (about "
            f"{MIN_TEST_BYTES // BYTES_PER_TOKEN:,} tokens are needed); add sources or mark more files as test")


class SplitError(ValueError):
    """Too few files for a split; the message says how many are needed and how many there are."""


def _rank(seed: int, rec: dict) -> str:
    # Not the source's id: it ends in a random suffix, so the same files added again (another home, a source
    # removed and added back, a benchmark's fresh home) would get another test set, and scoreboards and test
    # losses of the two could not be compared.
    key = f"{seed}\0{rec.get('sha256')}\0{rec['path']}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()  # names need not be UTF-8


def assign_sets(records: list[dict], *, test_share: float, max_test_files: int, seed: int) -> str | None:
    """Set `rec["set"]` to "train" or "test" on every accepted record. `rec["held_out"]` marks the user's
    test files. Raises SplitError when no split with at least one file on each side exists; returns a warning
    when the test set is too small for a stable test loss (else None)."""
    held = [r for r in records if r.get("held_out")]
    n = len(records)
    if held:
        train_shas = {r.get("sha256") for r in records if not r.get("held_out")}
        for r in records:
            # A held-out copy of a training file (possible only through force-include) trains instead.
            r["set"] = "test" if r.get("held_out") and r.get("sha256") not in train_shas else "train"
        n_train = sum(r["set"] == "train" for r in records)
        n_test = n - n_train
        if n_train == 0:
            raise SplitError(f"all {n} accepted files are held out as test; at least 1 training file is needed "
                             "(unmark a test source or add sources)")
        if n_test == 0:
            raise SplitError("every held-out test file duplicates a training file; at least 1 distinct test "
                             "file is needed")
        return small_test_warning(records)
    if n < 2:
        raise SplitError(f"{n} file{'' if n == 1 else 's'} accepted; at least 2 are needed (1 to train on, 1 to "
                         "test on): add sources or relax the filters")
    want = min(max_test_files, max(1, round(n * test_share)), n - 1)
    counts = Counter(r.get("sha256") for r in records)
    candidates = sorted((r for r in records if counts[r.get("sha256")] == 1), key=lambda r: _rank(seed, r))
    # A stub (an empty __init__.py, a 200-byte .pyi) measures almost nothing: files of a typical size go first.
    sizes = sorted(r.get("size") or 0 for r in records)
    floor = min(MIN_TEST_FILE_BYTES, sizes[len(sizes) // 2])
    candidates.sort(key=lambda r: (r.get("size") or 0) < floor)  # stable: rank order within each group
    if not candidates:
        raise SplitError(f"{n} files accepted but all share their content with another; at least 2 distinct "
                         "files are needed")
    # Grow a small test set towards MIN_TEST_BYTES, but never past a fifth of the files or max_test_files.
    cap = min(max_test_files, max(want, n // 5), n - 1)
    size = sum(r.get("size") or 0 for r in candidates[:want])
    while want < min(cap, len(candidates)) and size < MIN_TEST_BYTES:
        size += candidates[want].get("size") or 0
        want += 1
    test_ids = {id(r) for r in candidates[:want]}
    for r in records:
        r["set"] = "test" if id(r) in test_ids else "train"
    return small_test_warning(records)
