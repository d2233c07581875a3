"""The train/test split: held-out files first, else a seeded sample that never duplicates training."""

from __future__ import annotations

import hashlib
import random

import pytest

from refact_lab.data.split import MIN_TEST_BYTES, SplitError, assign_sets


def _recs(n: int, dup_of: dict[int, int] | None = None, size: int = 4000) -> list[dict]:
    out = []
    for i in range(n):
        content = (dup_of or {}).get(i, i)
        out.append({"source": "s", "path": f"f{i}.py", "size": size,
                    "sha256": hashlib.sha256(str(content).encode()).hexdigest()})
    return out


def _test_paths(recs):
    return sorted(r["path"] for r in recs if r["set"] == "test")


def test_automatic_split_is_deterministic_and_order_independent():
    a = _recs(200)
    assign_sets(a, test_share=0.05, max_test_files=20, seed=7)
    b = _recs(200)
    random.Random(1).shuffle(b)
    assign_sets(b, test_share=0.05, max_test_files=20, seed=7)
    assert _test_paths(a) == _test_paths(b) and len(_test_paths(a)) == 10
    c = _recs(200)
    assign_sets(c, test_share=0.05, max_test_files=20, seed=8)
    assert _test_paths(c) != _test_paths(a)
    # the same files under another source id (added again, in another home): the same test set
    d = [{**r, "source": "archive-pkg-3f9a1c"} for r in _recs(200)]
    assign_sets(d, test_share=0.05, max_test_files=20, seed=7)
    assert _test_paths(d) == _test_paths(a)


def test_at_least_one_and_at_most_max_test_files():
    small = _recs(3)
    assign_sets(small, test_share=0.0, max_test_files=20, seed=1)
    assert len(_test_paths(small)) == 1
    big = _recs(5000)
    assign_sets(big, test_share=0.5, max_test_files=20, seed=1)
    assert len(_test_paths(big)) == 20


def test_test_file_is_never_a_duplicate_of_a_training_file():
    recs = _recs(4, dup_of={1: 0, 3: 2})   # two pairs of identical files: no file may be tested
    with pytest.raises(SplitError, match="at least 2 distinct"):
        assign_sets(recs, test_share=0.5, max_test_files=2, seed=0)
    recs = _recs(6, dup_of={1: 0, 3: 2})
    assign_sets(recs, test_share=0.5, max_test_files=2, seed=0)
    train_shas = {r["sha256"] for r in recs if r["set"] == "train"}
    assert all(r["sha256"] not in train_shas for r in recs if r["set"] == "test")
    assert set(_test_paths(recs)) <= {"f4.py", "f5.py"}


def test_held_out_files_are_the_test_set():
    recs = _recs(10)
    recs[3]["held_out"] = recs[4]["held_out"] = True
    assign_sets(recs, test_share=0.5, max_test_files=20, seed=0)
    assert _test_paths(recs) == ["f3.py", "f4.py"]


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_files_says_how_many_are_needed(n):
    with pytest.raises(SplitError, match=f"{n} files? accepted; at least 2 are needed"):
        assign_sets(_recs(n), test_share=0.1, max_test_files=5, seed=0)


def test_everything_held_out_says_a_training_file_is_needed():
    recs = _recs(3)
    for r in recs:
        r["held_out"] = True
    with pytest.raises(SplitError, match="at least 1 training file is needed"):
        assign_sets(recs, test_share=0.1, max_test_files=5, seed=0)


def test_stubs_are_not_picked_for_the_test_set_when_real_files_exist():
    recs = _recs(100)
    for i, r in enumerate(recs):
        r["size"] = 150 if i % 2 else 4000  # half are stubs (an empty __init__.py, a small .pyi)
    assign_sets(recs, test_share=0.1, max_test_files=20, seed=3)
    test = [r for r in recs if r["set"] == "test"]
    assert len(test) == 10 and all(r["size"] == 4000 for r in test)
    # only small files: the split still happens, among them
    small = _recs(10)
    for r in small:
        r["size"] = 100
    warning = assign_sets(small, test_share=0.1, max_test_files=20, seed=3)
    assert sum(r["set"] == "test" for r in small) == 2   # grown towards a stable size, capped at a fifth
    assert warning.startswith("only 2 test files, ~50 tokens: the test loss will be noisy")


def test_a_small_test_set_grows_to_a_stable_size_within_its_caps():
    recs = _recs(50, size=2000)          # 5% would be 2 files, 4 KB: too few tokens for a stable test loss
    assert assign_sets(recs, test_share=0.05, max_test_files=20, seed=0) is None
    test = [r for r in recs if r["set"] == "test"]
    assert len(test) == MIN_TEST_BYTES // 2000 + (MIN_TEST_BYTES % 2000 > 0)   # just enough bytes
    assert sum(r["size"] for r in test) >= MIN_TEST_BYTES
    capped = _recs(50, size=2000)
    warning = assign_sets(capped, test_share=0.05, max_test_files=3, seed=0)   # the user's cap wins
    assert sum(r["set"] == "test" for r in capped) == 3
    assert warning.startswith("only 3 test files, ~1,500 tokens")


def test_a_large_enough_test_set_has_no_warning_and_held_out_sets_are_judged_too():
    recs = _recs(10, size=20_000)
    assert assign_sets(recs, test_share=0.1, max_test_files=20, seed=0) is None
    assert sum(r["set"] == "test" for r in recs) == 1
    held = _recs(10, size=100)
    held[0]["held_out"] = True
    assert assign_sets(held, test_share=0.1, max_test_files=20, seed=0).startswith("only 1 test file, ~25 tokens")
