"""Chunking for the retrieval index: whole definitions where a tree-sitter grammar parses the file (one case per
language the index supports), members of long definitions, the code between them, and line windows otherwise."""

from __future__ import annotations

import pytest

from refact_lab.context.chunking import (MAX_DEF_LINES, WINDOW, chunk_file, grammar, window_chunks)

# 12 lines of module-level code before the definition, so a window (every 10 lines) starts inside it
PREAMBLE = "".join(f"SETTING_{i} = {i}\n" for i in range(12))


def _body(prefix: str, n: int, end: str = "") -> str:
    return "".join(f"{prefix}total = total + {i}{end}\n" for i in range(n))


# one definition of 25 lines (longer than a window, so only definition chunking keeps it whole) per language
SAMPLES = {
    "mod.py": ("import os\n" + PREAMBLE,
               "def kestrel_rate(total):\n" + _body("    ", 23) + "    return total\n"),
    "mod.js": ("const fs = require('fs');\n" + PREAMBLE.replace("SETTING", "let SETTING"),
               "function kestrelRate(total) {\n" + _body("  ", 23, ";") + "}\n"),
    "mod.ts": ("import * as fs from 'fs';\n" + PREAMBLE.replace("SETTING", "let SETTING"),
               "export function kestrelRate(total: number): number {\n" + _body("  ", 23, ";") + "}\n"),
    "mod.tsx": ("import * as React from 'react';\n" + PREAMBLE.replace("SETTING", "let SETTING"),
                "export function KestrelRate(total: number) {\n" + _body("  ", 22, ";") + "  return <b>{total}</b>;\n}\n"),
    "mod.go": ("package rates\n\n" + "".join(f"var setting{i} = {i}\n" for i in range(12)),
               "func kestrelRate(total int) int {\n" + _body("\t", 23) + "}\n"),
    "mod.rs": ("use std::fs;\n" + "".join(f"const SETTING_{i}: i32 = {i};\n" for i in range(12)),
               "fn kestrel_rate(mut total: i32) -> i32 {\n" + _body("    ", 22, ";") + "    total\n}\n"),
    "Mod.java": ("package rates;\n" + "".join(f"import a.b.C{i};\n" for i in range(12)),
                 "class Rates {\n" + "  int kestrelRate(int total) {\n" + _body("    ", 22, ";") + "  }\n}\n"),
    "mod.c": ("#include <stdio.h>\n" + "".join(f"int setting_{i} = {i};\n" for i in range(12)),
              "int kestrel_rate(int total) {\n" + _body("    ", 23, ";") + "}\n"),
    "mod.cpp": ("#include <vector>\n" + "".join(f"int setting_{i} = {i};\n" for i in range(12)),
                "namespace rates {\nint kestrel_rate(int total) {\n" + _body("    ", 22, ";") + "}\n}\n"),
}


def _covered(chunks) -> set[int]:
    return {c.line + j for c in chunks for j, line in enumerate(c.text.splitlines()) if line.strip()}


def _nonblank(text: str) -> set[int]:
    return {i for i, line in enumerate(text.splitlines()) if line.strip()}


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_a_definition_is_one_chunk_in_every_supported_language(path):
    head, definition = SAMPLES[path]
    text = head + "\n" + definition + "\n" + head
    assert grammar(path) is not None
    chunks = chunk_file(path, text)
    assert [c for c in chunks if definition.strip() in c.text], "the definition is not whole in any chunk"
    # line windows never hold it whole: the definition is longer than a window
    assert not [c for c in window_chunks(path, text) if definition.strip() in c.text]
    assert _covered(chunks) == _nonblank(text)     # the code around it is indexed too
    assert all(c.text == "".join(text.splitlines(keepends=True)[c.line:c.end]) for c in chunks)


PY = '''"""A module."""

import os

# the rate a kestrel charges,
# in kestrel units
def kestrel_rate(x):
    return x * 2


def short():
    return 1


class Ledger:
    """Accounts."""

    def __init__(self):
        self.items = []

{methods}
def after():
    return os.sep
'''


def test_python_long_class_is_cut_at_its_methods_and_small_pieces_merge():
    methods = "".join(f"    def method_{i}(self, value):\n" + "".join(f"        value += {j}\n" for j in range(8))
                      + "        return value\n\n" for i in range(8))
    text = PY.format(methods=methods)
    chunks = chunk_file("pkg/ledger.py", text)
    assert _covered(chunks) == _nonblank(text)
    # the comment above a definition belongs with it; two small functions merge into one chunk
    first = next(c for c in chunks if "def kestrel_rate" in c.text)
    assert "# the rate a kestrel charges" in first.text and "def short" in first.text
    # the class is longer than MAX_DEF_LINES: no chunk holds all of it, but every method is whole in one
    assert len(text.split("class Ledger")[1].splitlines()) > MAX_DEF_LINES
    assert not [c for c in chunks if "method_0" in c.text and "method_7" in c.text]
    for i in range(8):
        method = methods.split("\n\n")[i].strip()
        assert [c for c in chunks if method in c.text], f"method_{i} is cut"
    assert all(len(c.text.splitlines()) <= max(WINDOW, MAX_DEF_LINES) for c in chunks)
    # chunks do not overlap: a definition is indexed once
    lines = [c.line + j for c in chunks for j in range(c.end - c.line)]
    assert len(lines) == len(set(lines))


def test_a_long_definition_without_members_becomes_windows():
    text = "def huge(total):\n" + _body("    ", 150) + "    return total\n"
    chunks = chunk_file("huge.py", text)
    assert len(chunks) > 1 and all(len(c.text.splitlines()) <= WINDOW for c in chunks)
    assert _covered(chunks) == _nonblank(text)


@pytest.mark.parametrize("path,text", [
    ("notes.txt", "".join(f"line {i}\n" for i in range(50))),        # no grammar for the extension
    ("broken.py", "def f(:\n" + "".join(f"x{i} = {i}\n" for i in range(50))),   # a syntax error
    ("mixed.py", "x = 1\r" * 30 + "def f():\n    return 1\n"),      # line breaks tree-sitter counts otherwise
])
def test_files_without_a_grammar_or_a_clean_parse_get_line_windows(path, text):
    assert chunk_file(path, text) == window_chunks(path, text)
    assert _covered(chunk_file(path, text)) == _nonblank(text)


def test_empty_and_blank_files_have_no_chunks():
    assert chunk_file("a.py", "") == [] and chunk_file("a.py", "\n\n  \n") == []
    assert chunk_file("a.rs", "") == [] and window_chunks("a.txt", "") == []
