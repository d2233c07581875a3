"""Chunks of a source file for the retrieval index: whole definitions where tree-sitter has a grammar, line
windows otherwise.

A snippet is most useful to a completion when it is a whole function or class: the model sees the signature and
the body together, and the budget is not spent on half of one definition and half of the next. So a file whose
language has a grammar (Python, JavaScript, TypeScript, Go, Rust, Java, C, C++) is parsed and cut at its
definitions:

- a definition of up to MAX_DEF_LINES lines (with the comments and attributes just above it) is one chunk;
- a longer one is cut at its members (a class at its methods, a namespace at its functions), its header and the
  code between members becoming chunks of their own; one without members is cut into line windows;
- code between definitions (imports, constants, a `main` block) is kept too, so every line is in some chunk;
- neighbouring small pieces are merged until a chunk would pass PACK_LINES lines, so a file of one-line getters
  does not become hundreds of tiny chunks.

A file without a grammar, or one the grammar cannot parse cleanly (a syntax error, a dialect it does not know),
is cut into windows of WINDOW whole lines every STRIDE lines, overlapping by half so that a definition cut by one
window is whole in the next. Chunks are whole lines either way: a snippet never starts mid-line.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

WINDOW = 20          # lines per window chunk
STRIDE = 10          # a new window every STRIDE lines: windows overlap by half
MAX_CHUNK_CHARS = 4000   # a minified line must not make one chunk the size of a file
MAX_DEF_LINES = 60   # a definition up to this long is one chunk: most functions fit, and it stays a snippet
PACK_LINES = WINDOW  # small neighbouring pieces merge into one chunk up to this many lines
MAX_DEPTH = 4        # how deep a long definition is cut at its members (class > method > nested function)
VERSION = 1          # bump when chunks change for the same text: indexes then chunk every file again

# file extension -> (grammar package, function returning its language)
GRAMMARS = {
    ".py": ("tree_sitter_python", "language"), ".pyi": ("tree_sitter_python", "language"),
    ".js": ("tree_sitter_javascript", "language"), ".mjs": ("tree_sitter_javascript", "language"),
    ".cjs": ("tree_sitter_javascript", "language"), ".jsx": ("tree_sitter_javascript", "language"),
    ".ts": ("tree_sitter_typescript", "language_typescript"),
    ".mts": ("tree_sitter_typescript", "language_typescript"),
    ".cts": ("tree_sitter_typescript", "language_typescript"),
    ".tsx": ("tree_sitter_typescript", "language_tsx"),
    ".go": ("tree_sitter_go", "language"),
    ".rs": ("tree_sitter_rust", "language"),
    ".java": ("tree_sitter_java", "language"),
    ".c": ("tree_sitter_c", "language"),
    # C++'s grammar also parses most C headers; a header it cannot parse falls back to windows
    ".h": ("tree_sitter_cpp", "language"),
    ".cc": ("tree_sitter_cpp", "language"), ".cpp": ("tree_sitter_cpp", "language"),
    ".cxx": ("tree_sitter_cpp", "language"), ".c++": ("tree_sitter_cpp", "language"),
    ".hh": ("tree_sitter_cpp", "language"), ".hpp": ("tree_sitter_cpp", "language"),
    ".hxx": ("tree_sitter_cpp", "language"), ".h++": ("tree_sitter_cpp", "language"),
}

# Node types that are definitions, across the grammars above (each name means a definition in every grammar
# that has it, so one set serves all).
DEFINITIONS = frozenset("""
function_definition class_definition decorated_definition
function_declaration generator_function_declaration class_declaration abstract_class_declaration
method_definition interface_declaration enum_declaration type_alias_declaration module internal_module
lexical_declaration export_statement
method_declaration type_declaration
function_item struct_item enum_item union_item impl_item trait_item mod_item macro_definition
constructor_declaration record_declaration annotation_type_declaration
class_specifier struct_specifier union_specifier enum_specifier namespace_definition template_declaration
type_definition
""".split())
# Nodes a long definition's members sit in (a class body, a block, an impl's declaration list), and nodes that
# only wrap code (an include guard, `extern "C" { }`): looked through, never chunks of their own.
BODIES = frozenset("""
block class_body statement_block declaration_list field_declaration_list interface_body enum_body object_type
enum_class_body compound_statement linkage_specification preproc_if preproc_ifdef preproc_else preproc_elif
""".split())
# Comments and attributes just above a definition belong with it.
LEADING = frozenset("comment line_comment block_comment attribute_item decorator".split())


@dataclass(frozen=True)
class Chunk:
    path: str     # the file's path in its source ("pkg/rates.py")
    line: int     # first line, 0-based
    text: str

    @property
    def end(self) -> int:
        """One past the last line. Lines as the chunker counts them (splitlines): counting "\n" alone made a
        file with "\r" line breaks all one line, so its overlapping windows were all returned as snippets."""
        return self.line + max(len(self.text.splitlines()), 1)


def window_chunks(path: str, text: str) -> list[Chunk]:
    """Windows of WINDOW whole lines every STRIDE lines; the last window reaches the end of the file."""
    lines = text.splitlines(keepends=True)
    return _chunks(path, lines, _windows(0, len(lines) - 1))


def chunk_file(path: str, text: str) -> list[Chunk]:
    """The chunks of one file: its definitions where a grammar parses it, else line windows."""
    language = grammar(path)
    if language is None or text.count("\n") < PACK_LINES:
        return window_chunks(path, text)   # (a file this short is one chunk either way: no parse needed)
    try:
        from tree_sitter import Parser

        data = text.encode("utf-8", errors="surrogatepass")
        root = Parser(language).parse(data).root_node
    except (ValueError, RuntimeError, UnicodeError):
        return window_chunks(path, text)
    if root.has_error:
        return window_chunks(path, text)
    lines = text.splitlines(keepends=True)
    # tree-sitter counts rows at "\n" only; a file with other line breaks ("\r" alone, form feeds) would not
    # line up with splitlines: windows then
    if data.count(b"\n") + (not data.endswith(b"\n") and bool(data)) != len(lines):
        return window_chunks(path, text)
    pieces: list[tuple[int, int, bool]] = []
    _layout(root.named_children, 0, len(lines) - 1, 0, pieces)
    return _chunks(path, lines, _pack(pieces))


@functools.lru_cache(maxsize=None)
def _language(module: str, function: str):
    # Language objects are immutable and cost a load each; parsers are made per file (not thread-safe)
    from tree_sitter import Language

    try:
        return Language(getattr(importlib.import_module(module), function)())
    except (ImportError, AttributeError, ValueError):
        return None   # the grammar package is missing or too new for this tree-sitter: windows


def _spec(path: str) -> tuple[str, str] | None:
    name = path.rsplit("/", 1)[-1].lower()
    dot = name.rfind(".")
    return GRAMMARS.get(name[dot:]) if dot > 0 else None


def grammar(path: str):
    """The tree-sitter language for `path` from its extension, or None (no grammar: line windows)."""
    spec = _spec(path)
    return _language(*spec) if spec else None


def kind(path: str) -> str:
    """How `path` is chunked ("lines", or its grammar: "python", "typescript.language_tsx"...): the same text
    is chunked the same way only under the same kind, so stored chunks are keyed by content and kind."""
    spec = _spec(path)
    if spec is None or _language(*spec) is None:
        return "lines"
    return spec[0].removeprefix("tree_sitter_") + ("" if spec[1] == "language" else "." + spec[1])


def _rows(node, lo: int, hi: int) -> tuple[int, int]:
    start, end = node.start_point[0], node.end_point[0]
    if node.end_point[1] == 0 and end > start:   # a node that ends with its newline ends on the line before
        end -= 1
    return max(start, lo), min(end, hi)


def _members(node) -> list:
    """The nodes inside a definition that may be definitions themselves: its children, with bodies opened."""
    out = []
    for child in node.named_children:
        out.extend(_members(child) if child.type in BODIES else [child])
    return out


def _layout(nodes, lo: int, hi: int, depth: int, out: list[tuple[int, int, bool]]) -> None:
    """Cover lines lo..hi with pieces (first, last, packable): definitions among `nodes` and the code between."""
    cur = lo          # the first line not yet in a piece
    lead = None       # where the comments just above the next node began
    lead_end = -2
    for node in nodes:
        start, end = _rows(node, lo, hi)
        if end < cur:
            continue  # on a line a previous piece already holds (`} else {`, two statements on one line)
        start = max(start, cur)
        if node.type in LEADING:
            lead = start if lead is None or start > lead_end + 1 else lead
            lead_end = end
            continue
        if node.type in BODIES:
            _gap(cur, start - 1, out)
            _layout(node.named_children, start, end, depth, out)
            cur, lead = end + 1, None
            continue
        if node.type not in DEFINITIONS:
            lead = None
            continue      # ordinary code: part of the gap before the next definition
        if lead is not None and lead_end >= start - 1:
            start = lead
        lead = None
        _gap(cur, start - 1, out)
        if end - start + 1 <= MAX_DEF_LINES:
            out.append((start, end, True))
        else:
            members = _members(node) if depth < MAX_DEPTH else []
            if any(m.type in DEFINITIONS for m in members):
                _layout(members, start, end, depth + 1, out)
            else:
                out.extend((a, b, False) for a, b in _windows(start, end))
        cur = end + 1
    _gap(cur, hi, out)


def _gap(first: int, last: int, out: list[tuple[int, int, bool]]) -> None:
    """Code between definitions: one packable piece, or windows when it is long."""
    if last < first:
        return
    if last - first + 1 <= PACK_LINES:
        out.append((first, last, True))
    else:
        out.extend((a, b, False) for a, b in _windows(first, last))


def _windows(first: int, last: int) -> list[tuple[int, int]]:
    """Lines first..last as windows of WINDOW lines every STRIDE; the last one ends at `last`."""
    n = last - first + 1
    if n <= 0:
        return []
    out = [(s, min(s + WINDOW, last + 1) - 1) for s in range(first, first + max(n - WINDOW, 0) + 1, STRIDE)]
    if n > WINDOW and (n - WINDOW) % STRIDE:
        out.append((last + 1 - WINDOW, last))
    return out


def _pack(pieces: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    """Merge runs of small neighbouring pieces while the merged chunk stays within PACK_LINES lines."""
    out: list[tuple[int, int]] = []
    group: list[int] | None = None   # [first, last] of the chunk being filled
    for first, last, packable in pieces:
        if group is not None and packable and last - group[0] + 1 <= PACK_LINES:
            group[1] = last
            continue
        if group is not None:
            out.append((group[0], group[1]))
            group = None
        if packable:
            group = [first, last]
        else:
            out.append((first, last))
    if group is not None:
        out.append((group[0], group[1]))
    return out


def _chunks(path: str, lines: list[str], spans: list[tuple[int, int]]) -> list[Chunk]:
    out = []
    for first, last in spans:
        # blank lines at either end of a chunk only cost budget
        while first < last and not lines[first].strip():
            first += 1
        while last > first and not lines[last].strip():
            last -= 1
        text = "".join(lines[first:last + 1])
        if text.strip():
            out.append(Chunk(path, first, text[:MAX_CHUNK_CHARS]))
    return out
