"""Fill-in-the-middle examples from source files, in the base model's own FIM format and order.

A file is cut into windows of whole lines that fit a training sequence; each window becomes one example:

* ``inline``    — the middle is a span strictly inside one line (the cursor is mid-line, text follows it);
* ``eol``       — the middle runs from the cursor to the end of its line (single-line completion);
* ``multiline`` — the middle runs from the cursor over one to eight whole lines (block completion);
* ``plain``     — no FIM at all, the window as plain text (keeps ordinary left-to-right completion sharp).

The text is laid out exactly as the server and the IDE clients lay out a prompt (`FimFormat.prompt`, PSM for
Qwen2.5-Coder and StarCoder, SPM where the registry says so), followed by the middle and the end-of-text token,
so training teaches the model the very format it is asked in at inference.

Everything random takes an explicit `random.Random`, so a (seed, epoch) pair always gives the same examples
and the test set, drawn from a fixed tag, is identical across steps and runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from refact_lab.models.boundary import cursor_boundary
from refact_lab.models.registry import FimFormat

# How often each kind of split is drawn among FIM examples. IDE completion is mostly "rest of this line" and
# "the next few lines"; splits inside a line (the cursor before a closing bracket) are rarer but common enough
# that the model must learn to stop before the text that follows the cursor.
MODE_WEIGHTS = {"inline": 0.25, "eol": 0.35, "multiline": 0.40}
MAX_MIDDLE_LINES = 8


@dataclass(frozen=True)
class Example:
    """One training example. For ``plain`` only `prefix` holds text; `suffix` and `middle` are empty."""

    kind: str
    prefix: str
    suffix: str = ""
    middle: str = ""

    def text(self, fmt: FimFormat) -> str:
        """The example as the model sees it; FIM examples end with the model's end-of-text token."""
        if self.kind == "plain":
            return self.prefix + fmt.eot
        return fmt.prompt(self.prefix, self.suffix) + self.middle + fmt.eot

    @property
    def source(self) -> str:
        """The original window text (prefix + middle + suffix), for checking that nothing is lost."""
        return self.prefix + self.middle + self.suffix


def windows(text: str, max_chars: int) -> list[str]:
    """Cut `text` into consecutive windows of whole lines, each at most `max_chars` long.

    A single line longer than `max_chars` (rare after the scan's filters) is hard-split so no window overflows.
    Concatenating the windows gives back `text` exactly.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                out.append("".join(current))
                current, size = [], 0
            out.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            out.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        out.append("".join(current))
    return [w for w in out if w]


def _line_spans(window: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each line's content, the end excluding its newline."""
    spans = []
    pos = 0
    for line in window.splitlines(keepends=True):
        content = line.rstrip("\r\n")
        spans.append((pos, pos + len(content)))
        pos += len(line)
    return spans


def _split(window: str, start: int, end: int, kind: str) -> Example:
    # The prefix ends at the cursor's token boundary, where token healing cuts a prompt at inference (one
    # definition: refact_lab.models.boundary), so the model learns the prompts it is asked with.
    start = cursor_boundary(window, start)
    return Example(kind, window[:start], window[end:], window[start:end])


def fim_example(window: str, rng: random.Random, kind: str | None = None) -> Example:
    """Split one window into prefix / middle / suffix. Falls back to a plain example when the window has
    no line long enough for the drawn kind of split."""
    if kind is None:
        kind = rng.choices(list(MODE_WEIGHTS), weights=list(MODE_WEIGHTS.values()))[0]
    spans = _line_spans(window)
    # lines with some non-blank content: a cursor in an empty line makes a degenerate example
    useful = [i for i, (a, b) in enumerate(spans) if window[a:b].strip()]
    if kind == "inline":
        # start < end < line end: text remains after the middle on the same line
        candidates = [i for i in useful if spans[i][1] - spans[i][0] >= 2]
        if candidates:
            a, b = spans[rng.choice(candidates)]
            start = rng.randrange(a, b - 1)
            end = rng.randrange(start + 1, b)
            return _split(window, start, end, "inline")
        kind = "eol"
    if kind == "eol":
        if useful:
            a, b = spans[rng.choice(useful)]
            start = rng.randrange(a, b)
            return _split(window, start, b, "eol")
        return Example("plain", window)
    if kind == "multiline":
        if useful:
            i = rng.choice(useful)
            a, b = spans[i]
            # Half the time the cursor sits at the start of the line's code (after its indentation), the way a
            # user opens a new statement; otherwise anywhere in the line.
            indent = len(window[a:b]) - len(window[a:b].lstrip())
            start = a + indent if rng.random() < 0.5 else rng.randrange(a, b + 1)
            last = min(len(spans) - 1, i + rng.randint(1, MAX_MIDDLE_LINES) - 1)
            end = spans[last][1]
            # The middle takes the newline of its last line, so the suffix starts at the next line, which is
            # where a multi-line completion stops.
            if end < len(window) and window[end] == "\r":
                end += 1
            if end < len(window) and window[end] == "\n":
                end += 1
            if end > start:
                return _split(window, start, end, "multiline")
        return Example("plain", window)
    raise ValueError(f"unknown FIM kind {kind!r}")


def file_examples(text: str, rng: random.Random, *, max_chars: int, fim_rate: float) -> list[Example]:
    """All examples of one file: one per window, FIM with probability `fim_rate`, plain otherwise."""
    out = []
    for window in windows(text, max_chars):
        if rng.random() < fim_rate:
            out.append(fim_example(window, rng))
        else:
            out.append(Example("plain", window))
    return out
