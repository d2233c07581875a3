"""The cursor set: every kind at its realistic position, drawn deterministically from real held-out code."""

from __future__ import annotations

import re
from collections import Counter

from refact_lab.scoreboard.cursors import KINDS, defined_names, fingerprint, project_definitions, sample_cursors
from tests.finetune.conftest import STDLIB

FILES = [(name, (STDLIB / name).read_text()) for name in ("textwrap.py", "sched.py", "json/decoder.py")]


def test_each_kind_gets_its_share_at_its_position():
    cursors = sample_cursors(FILES, 100, seed=7)
    # without the project's definitions there are no cross_file cursors: the five others share the set
    assert Counter(c.kind for c in cursors) == {k: 20 for k in KINDS if k != "cross_file"}
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


JSON_PACKAGE = [(name, (STDLIB / name).read_text())
                for name in ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py")]


def test_cross_file_cursors_start_a_call_of_what_only_another_file_defines():
    definitions = project_definitions(JSON_PACKAGE)
    assert {"JSONDecoder", "JSONEncoder"} <= definitions["json/decoder.py"] | definitions["json/encoder.py"]
    held_out = [f for f in JSON_PACKAGE if f[0] == "json/__init__.py"]
    cursors = sample_cursors(held_out, 60, seed=2, definitions=definitions)
    cross = [c for c in cursors if c.kind == "cross_file"]
    assert len(cross) >= 3
    own = definitions["json/__init__.py"]
    assert {"dump", "loads"} <= own
    for c in cross:
        name = re.match(r"[A-Za-z_][A-Za-z0-9_]*", c.expected).group(0)
        assert name not in own and any(name in names for key, names in definitions.items() if key != c.file)
        assert c.expected.startswith(name) and re.match(rf"{name}\s*\(", c.expected)
        assert "\n" not in c.expected and c.single_line
    assert {re.match(r"\w+", c.expected).group(0) for c in cross} <= {"JSONDecoder", "JSONEncoder"} | {
        n for key, names in definitions.items() if key != "json/__init__.py" for n in names}


def test_definitions_are_found_in_the_common_languages():
    assert defined_names("def load(x):\n    class Inner:\n        async def run(self): ...\n") == {
        "load", "Inner", "run"}
    assert defined_names("export function parseRate(a) {}\nconst toCents = (x) => x * 100;\n"
                         "export default class Shop {}\n") == {"parseRate", "toCents", "Shop"}
    assert defined_names("func (s *Server) Serve() error {\n}\nfunc NewServer() *Server {}\n") == {
        "Serve", "NewServer"}
    assert defined_names("pub fn convert(x: u32) -> u32 { x }\npub(crate) struct Rate;\n") == {"convert", "Rate"}
