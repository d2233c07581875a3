"""When a code completion ends, and how much of the decoded text is safe to stream so far.

Four kinds of rule, checked after every generated token:

- special tokens (end-of-text and the model's FIM tokens) always end a completion; they are matched by token
  id by the batch decoder, and also as text here for tokenizers that spell them out of ordinary pieces;
- `stop` strings from the request: the text is cut just before the first one (OpenAI semantics);
- single-line requests stop at the first newline;
- the loop guard: a completion whose end repeats one piece of text three times in a row ("None, None, None, ")
  is stopped and cut after the first copy, unless the code around the cursor repeats that piece itself (a
  table, a row of zeros); a run of one character is cut once it is longer than 24 and than any run of that
  character around the cursor (a ruler as long as the file's own is fine). Small models fall into such loops
  and would otherwise fill max_tokens with them.

While a completion runs, text that could still turn into a stop string (a tail of it that is a prefix of one)
is held back, so a streaming client never receives characters that the final answer would not contain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"  # a decoded byte sequence that is not complete UTF-8 yet


LOOP_COPIES = 3
LOOP_UNIT_MIN, LOOP_UNIT_MAX = 3, 200  # characters in the repeated piece


def find_loop(text: str, context: str = "") -> int | None:
    """Where a loop at the end of `text` should be cut (after its first copy), or None.

    A loop is a piece of LOOP_UNIT_MIN..LOOP_UNIT_MAX characters ending the text LOOP_COPIES times in a row,
    with at least two different non-blank characters (so indentation and "-----" rulers are not loops), that
    `context` (the code around the cursor) does not itself repeat as often.
    """
    n = len(text)
    if n < LOOP_COPIES * LOOP_UNIT_MIN:
        return None
    # A loop of period u means the copy before the last one ends with the same characters as the text: only the
    # earlier places where the text's last few characters occur are candidate periods (checked shortest first).
    tail = text[n - LOOP_UNIT_MIN:]
    lowest = max(0, n - LOOP_UNIT_MAX - LOOP_UNIT_MIN)
    if len(set(text[lowest:]) - set(" \t\n")) < 2:
        return None  # rulers, blank runs, "- - - -": no unit here could have two different characters
    # a period within the trailing run of one character ("-------") would be a one-character unit: skip them
    run = n - len(text.rstrip(text[-1]))
    end = n - max(run + 1, LOOP_UNIT_MIN)
    if end - LOOP_UNIT_MIN < lowest:
        return None
    i = text.rfind(tail, lowest, end)
    while i != -1:
        u = n - (i + LOOP_UNIT_MIN)
        if LOOP_COPIES * u > n:
            break
        unit = text[n - u:]
        if (text[n - LOOP_COPIES * u:n - u] == unit * (LOOP_COPIES - 1) and len(set(unit) - set(" \t\n")) >= 2
                and unit * LOOP_COPIES not in context):
            return n - (LOOP_COPIES - 1) * u
        i = text.rfind(tail, lowest, i + LOOP_UNIT_MIN - 1)
    return None


RUN_MIN = 24  # a run of one character may always grow this long


def find_runaway_run(text: str, context: str = "") -> int | None:
    """Where a run of one non-blank character at the end of `text` should be cut, or None.

    Rulers and underlines ("-----", "^^^^") are code, so a run is a loop only once it outgrows both RUN_MIN and
    the longest run of that character in the code around the cursor; it is cut to that length.
    """
    c = text[-1:] if text else ""
    if not c or c in " \t\n":
        return None
    run = len(text) - len(text.rstrip(c))
    if run <= RUN_MIN:
        return None
    runs = re.findall(re.escape(c) + "{%d,}" % (RUN_MIN + 1), context)
    cap = max([RUN_MIN, *map(len, runs)])
    return len(text) - run + cap if run > cap else None


def find_loop_cut(text: str, context: str = "") -> int | None:
    """What the loop guard cuts: a repeated piece (find_loop) or a runaway run of one character."""
    cut = find_loop(text, context)
    return find_runaway_run(text, context) if cut is None else cut


@dataclass(frozen=True)
class StopRules:
    stop: tuple[str, ...] = ()
    single_line: bool = False
    special_text: tuple[str, ...] = ()
    loop_guard: bool = True
    context: str = ""  # text around the cursor (the prompt's end), for the loop guard

    @property
    def strings(self) -> tuple[str, ...]:
        extra = ("\n",) if self.single_line else ()
        return tuple(s for s in dict.fromkeys((*self.stop, *extra, *self.special_text)) if s)

    def find(self, text: str) -> int | None:
        """Index where the completion ends because of a stop string or a loop, or None."""
        best = None
        for s in self.strings:
            i = text.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
        if best is None and self.loop_guard:
            best = find_loop_cut(text, self.context)
        return best

    def safe_length(self, text: str) -> int:
        """How much of `text` may be streamed now: hold back a possible start of a stop string and any
        incomplete UTF-8 character at the end."""
        n = len(text)
        while n > 0 and text[n - 1] == REPLACEMENT_CHAR:
            n -= 1
        hold = 0
        for s in self.strings:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[n - k:n] == s[:k]:
                    hold = max(hold, k)
                    break
        return n - hold
