"""Cursors for the scoreboard: realistic IDE positions in held-out files, each labelled with its kind.

Kinds (what a user is doing when the completion is asked for):

* ``newline_indent`` - at the start of a line's code, after its indentation (the editor auto-indented a fresh
  line); expected: the rest of that line.
* ``after_operator`` - just after ``= ``, ``(``, ``, ``, ``return `` and similar; expected: the rest of the line.
* ``mid_identifier`` - inside a word of 4+ characters; expected: the rest of the line.
* ``end_of_line``   - after a word or symbol boundary mid-line, the rest of the line to write.
* ``multi_line``    - at the start of a block's body (after a line ending in ``:``); expected: the body's first
  2-8 lines.
* ``cross_file``    - at the start of a call of a function or class that the project defines only in another file
  (the name cannot be guessed from the file itself: repository context is what makes it right); expected: the
  rest of the line. Drawn only when the project's definitions are given (`definitions`).

The suffix of a single-line cursor starts at the end of its line (IDEs complete the rest of the line); the
suffix of a multi_line cursor starts after the expected lines. The set is a pure function of the files and the
seed: candidates are enumerated in file order and drawn with `random.Random(seed)`, an equal share per kind.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass

KINDS = ("newline_indent", "after_operator", "mid_identifier", "end_of_line", "multi_line", "cross_file")
SINGLE_LINE_KINDS = frozenset(KINDS) - {"multi_line"}
MIN_CROSS_FILE_NAME = 4   # shorter names (`run`, `get`) are too often guessed without any context
DEFAULT_CURSORS = 200
DEFAULT_SEED = 1234
MAX_BODY_LINES = 8
# A longer line is data (a minified bundle, an embedded blob), not code someone types: its every operator and
# word would be a candidate, thousands from one line outweighing the project, each expecting a completion of
# up to the whole line (and enumerating them is quadratic in the line's length)
MAX_LINE_CHARS = 1000

# an operator or keyword after which a new expression starts; the cursor goes after the match
_AFTER_OPERATOR = re.compile(r"(?:[-+*/%&|^<>!=]?=|[(\[{]|, |\breturn |\byield |\bin |\bnot |\band |\bor |: |-> )")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CALL = re.compile(r"(?<!\w)([A-Za-z_][A-Za-z0-9_]*)\s*\(")
# a definition's name in the common languages' spellings (Python, JS/TS, Go, Rust, Kotlin/Swift, C#...);
# `definitions` only has to be right often enough to find cursors where another file holds the answer
_DEFINITION = re.compile(
    r"^[ \t]*(?:export[ \t]+)?(?:default[ \t]+)?(?:pub(?:\([^)]*\))?[ \t]+)?(?:async[ \t]+)?"
    r"(?:def|class|function\*?|func|fn|fun|interface|struct|enum|trait|type)[ \t]+"
    r"(?:\([^)]*\)[ \t]*)?([A-Za-z_][A-Za-z0-9_]*)"
    r"|^[ \t]*(?:export[ \t]+)?(?:const|let|var)[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(?:async[ \t]*)?"
    r"(?:function|\([^)]*\)[ \t]*=>)", re.MULTILINE)


def defined_names(text: str) -> frozenset[str]:
    """The names a file defines at any depth (functions, classes, methods; JS function constants)."""
    return frozenset(a or b for a, b in _DEFINITION.findall(text))


def project_definitions(files: list[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """{file key: names it defines} for every file of a project (training files too: that is where the
    definitions a held-out file calls usually live)."""
    return {key: defined_names(text) for key, text in files}

@dataclass(frozen=True)
class Cursor:
    id: str          # stable: file key, offset and kind
    kind: str
    file: str
    line: int        # 1-based line of the cursor
    offset: int      # character offset in the file
    prefix: str
    suffix: str
    expected: str

    @property
    def single_line(self) -> bool:
        return self.kind in SINGLE_LINE_KINDS

    def summary(self) -> dict:
        """What a report shows about the cursor (the code just before it and what was expected)."""
        d = asdict(self)
        d["prefix"] = "\n".join(self.prefix.split("\n")[-4:])
        d.pop("suffix")
        return d


def _lines(text: str) -> list[tuple[int, str]]:
    """(start offset, content without its newline) of every line."""
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, line.rstrip("\r\n")))
        pos += len(line)
    return out


def _code(content: str) -> bool:
    s = content.strip()
    return bool(s) and not s.startswith("#")


def _candidates(text: str, foreign: frozenset[str] = frozenset()) -> dict[str, list[tuple[int, int]]]:
    """Per kind, (cursor offset, end offset of the expected text) candidates in one file. `foreign`: names
    defined in other files of the project and not in this one."""
    lines = _lines(text)
    out: dict[str, list[tuple[int, int]]] = {k: [] for k in KINDS}
    for i, (start, content) in enumerate(lines):
        if not _code(content) or len(content) > MAX_LINE_CHARS:
            continue
        indent = len(content) - len(content.lstrip())
        end = start + len(content.rstrip())
        code_start = start + indent
        out["newline_indent"].append((code_start, end))
        for m in _AFTER_OPERATOR.finditer(content, indent):
            pos = start + m.end()
            if text[pos:end].strip() and not text[pos].isspace():
                out["after_operator"].append((pos, end))
        if foreign:
            for m in _CALL.finditer(content, indent):
                name = m.group(1)
                if len(name) >= MIN_CROSS_FILE_NAME and name in foreign:
                    out["cross_file"].append((start + m.start(1), end))
        for m in _IDENTIFIER.finditer(content, indent):
            if m.end() - m.start() >= 4:
                out["mid_identifier"].append((start + m.start() + (m.end() - m.start()) // 2, end))
        for j in range(indent + 1, len(content.rstrip())):
            a, b = content[j - 1], content[j]
            word = (a.isalnum() or a == "_") and (b.isalnum() or b == "_")
            if not word and not b.isspace() and content[j:].strip():
                out["end_of_line"].append((start + j, end))
        # a block opener followed by a more-indented body: the cursor starts the body
        if content.rstrip().endswith(":") and i + 1 < len(lines):
            body_start, body = lines[i + 1]
            body_indent = len(body) - len(body.lstrip())
            if not _code(body) or body_indent <= indent:
                continue
            last = i + 1
            for k in range(i + 1, min(len(lines), i + 1 + MAX_BODY_LINES)):
                s, c = lines[k]
                if (c.strip() and len(c) - len(c.lstrip()) < body_indent) or len(c) > MAX_LINE_CHARS:
                    break
                if c.strip():
                    last = k
            if last > i + 1:  # 2+ lines: one line is the other kinds' business
                out["multi_line"].append((body_start + body_indent, lines[last][0] + len(lines[last][1].rstrip())))
    return out


def sample_cursors(files: list[tuple[str, str]], n: int = DEFAULT_CURSORS, seed: int = DEFAULT_SEED,
                   definitions: dict[str, frozenset[str]] | None = None) -> list[Cursor]:
    """`n` cursors drawn from `files` ((key, text) pairs), an equal share per kind where a kind has enough
    candidates (a kind that runs short leaves its share to the others). With `definitions` (`project_definitions`
    of the whole project) `cross_file` cursors are drawn too; without, that kind takes no share."""
    if n < 1:
        raise ValueError(f"the number of cursors must be at least 1, got {n}")
    kinds = KINDS if definitions is not None else tuple(k for k in KINDS if k != "cross_file")
    everywhere = frozenset().union(*definitions.values()) if definitions else frozenset()
    pool: dict[str, list[tuple[str, str, int, int]]] = {k: [] for k in KINDS}
    for key, text in sorted(files):
        own = definitions.get(key, defined_names(text)) if definitions is not None else frozenset()
        for kind, cands in _candidates(text, everywhere - own).items():
            pool[kind].extend((key, text, a, b) for a, b in cands)
    rng = random.Random(seed)
    # shares: n split evenly; what a short kind cannot fill goes to the kinds with candidates left
    want = {k: n // len(kinds) + (i < n % len(kinds)) for i, k in enumerate(kinds)}
    spare = 0
    for k in kinds:
        if len(pool[k]) < want[k]:
            spare += want[k] - len(pool[k])
            want[k] = len(pool[k])
    while spare:
        open_kinds = [k for k in kinds if len(pool[k]) > want[k]]
        if not open_kinds:
            break
        for k in open_kinds:
            if spare:
                want[k] += 1
                spare -= 1
    out = []
    for k in kinds:
        for key, text, a, b in rng.sample(pool[k], want[k]):
            suffix_at = b if k == "multi_line" else (text.find("\n", a) if "\n" in text[a:] else len(text))
            out.append(Cursor(_cursor_id(key, a, k), k, key, text.count("\n", 0, a) + 1, a, text[:a],
                              text[suffix_at:], text[a:b]))
    return out


def _cursor_id(key: str, offset: int, kind: str) -> str:
    return hashlib.sha1(f"{key}\0{offset}\0{kind}".encode()).hexdigest()[:12]


def fingerprint(cursors: list[Cursor]) -> str:
    """Identifies a cursor set: results are comparable only between runs over the same one."""
    h = hashlib.sha1()
    for c in cursors:
        h.update(f"{c.id}\0{c.expected}\0".encode())
    return h.hexdigest()[:16]
