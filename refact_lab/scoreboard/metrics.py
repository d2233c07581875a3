"""Scores of one completion against the expected text, and their aggregation per kind and overall.

- exact_match: the completion's first line equals the expected first line (trailing blanks ignored, leading
  ones not: a completion that repeats the line's indentation is wrong where it lands);
- edit_similarity: 1 - Levenshtein distance / the longer length (CrossCodeEval's ES), on the first line for
  single-line cursors and on as many lines as expected for multi-line ones;
- identifier_f1: F1 of the multisets of identifiers in the compared texts (both empty: 1);
- degenerate: a blank completion where code was expected, a single-line completion that ran to its token limit
  without ending its line, or one the serving loop guard (`refact_lab.serve.stops.find_loop_cut`) still finds
  a loop in;
- named_right: the completion's first identifier is the expected one (for cross_file cursors: the function
  another file defines was called by its name);
- p50_ms: median wall-clock time of a completion (the one number that differs between two identical runs).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from refact_lab.serve.stops import find_loop_cut

FIELDS = ("exact_match", "edit_similarity", "identifier_f1", "named_right", "degenerate", "p50_ms")
# in any script: with ASCII names only, two completions made of other names (`größe`, `计算`) both had none and
# scored identifier F1 1.0 and "named right", whatever they said
_IDENTIFIER = re.compile(r"[^\W\d]\w*")


def edit_similarity(a: str, b: str) -> float:
    from rapidfuzz.distance import Levenshtein

    if not a and not b:
        return 1.0
    return float(Levenshtein.normalized_similarity(a, b))


def identifier_f1(got: str, want: str) -> float:
    g, w = Counter(_IDENTIFIER.findall(got)), Counter(_IDENTIFIER.findall(want))
    if not g and not w:
        return 1.0
    common = sum((g & w).values())
    if not common:
        return 0.0
    precision, recall = common / sum(g.values()), common / sum(w.values())
    return 2 * precision * recall / (precision + recall)


def _first_identifier(text: str) -> str | None:
    m = _IDENTIFIER.search(text)
    return m.group(0) if m else None


def compared(text: str, expected: str, single_line: bool) -> tuple[str, str]:
    """The parts of completion and expected text that are scored."""
    if single_line:
        return text.split("\n", 1)[0].rstrip(), expected.split("\n", 1)[0].rstrip()
    n = expected.count("\n") + 1
    return "\n".join(text.split("\n")[:n]).rstrip(), expected.rstrip()


def score(text: str, expected: str, *, single_line: bool, finish_reason: str = "stop", context: str = "") -> dict:
    """The per-cursor scores (without latency)."""
    got, want = compared(text, expected, single_line)
    blank = not text.strip() and bool(expected.strip())
    runaway = single_line and finish_reason == "length" and "\n" not in text
    return {"exact_match": float(got.split("\n", 1)[0] == want.split("\n", 1)[0]),
            "edit_similarity": edit_similarity(got, want),
            "identifier_f1": identifier_f1(got, want),
            "named_right": float(_first_identifier(got) == _first_identifier(want)),
            "degenerate": float(blank or runaway or find_loop_cut(text, context) is not None)}


def aggregate(rows: list[dict]) -> dict:
    """Means of the scores (rounded to 4 places, so equal runs print equal numbers) and the median latency."""
    if not rows:
        return {**{k: None for k in FIELDS}, "n": 0}
    out = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in FIELDS if k != "p50_ms"}
    out["p50_ms"] = round(statistics.median(r["ms"] for r in rows), 1)
    out["n"] = len(rows)
    return out
