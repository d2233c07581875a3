"""The cursor set: every kind at its realistic position, drawn deterministically from real held-out code."""

from __future__ import annotations

import re
from collections import Counter

from refact_lab.scoreboard.cursors import KINDS, fingerprint, sample_cursors
from tests.finetune.conftest import STDLIB

FILES = [(name, (STDLIB / name).read_text()) for name in ("textwrap.py", "sched.py", "json/decoder.py")]


def test_each_kind_gets_its_share_at_its_position():
    cursors = sample_cursors(FILES, 100, seed=7)
    assert Counter(c.kind for c in cursors) == {k: 20 for k in KINDS}
    texts = dict(FILES)
    for c in cursors:
        text = texts[c.file]
        # the cursor splits the file: prefix + expected is the file up to the expected text's end
        assert text[:c.offset] == c.prefix and text[c.offset:].startswith(c.expected) and c.expected.strip()
        assert c.line == c.prefix.count("\n") + 1
        line_before = c.prefix.rsplit("\n", 1)[-1]
        if c.kind == "newline_indent":
            assert not line_before.strip() and not c.expected[0].isspace() and "\n" not in c.expected
        elif c.kind == "after_operator":
            assert re.search(r"([-+*/%&|^<>!=]?=|[(\[{]|, |return |yield |in |not |and |or |: |-> )$", line_before)
            assert not c.expected[0].isspace()
        elif c.kind == "mid_identifier":
            assert re.search(r"[A-Za-z0-9_]$", line_before) and re.match(r"[A-Za-z0-9_]", c.expected)
        elif c.kind == "end_of_line":
            assert line_before.strip() and "\n" not in c.expected
        else:  # a block body: the line before the cursor's opens it, 2-8 lines expected
            opener = c.prefix.rstrip(" \t").rsplit("\n", 2)[-2]
            assert opener.rstrip().endswith(":") and 2 <= c.expected.count("\n") + 1 <= 8
        if c.single_line:
            assert c.suffix == "" or c.suffix.startswith(("\n", "\r"))


def test_same_files_and_seed_give_the_same_cursors():
    a, b = sample_cursors(FILES, 60, seed=3), sample_cursors(list(reversed(FILES)), 60, seed=3)
    assert a == b and fingerprint(a) == fingerprint(b)
    other = sample_cursors(FILES, 60, seed=4)
    assert fingerprint(other) != fingerprint(a)


def test_a_kind_that_runs_short_leaves_its_share_to_the_others():
    flat = [("flat.py", "import os\nimport sys\nx = os.path.join(sys.prefix, 'lib')\n")]
    cursors = sample_cursors(flat, 20, seed=1)
    kinds = Counter(c.kind for c in cursors)
    assert "multi_line" not in kinds and len(cursors) == 20
