"""When a code completion ends, and how much of the decoded text is safe to stream so far.

Three kinds of rule, checked after every generated token:

- special tokens (end-of-text and the model's FIM tokens) always end a completion; they are matched by token
  id by the batch decoder, and also as text here for tokenizers that spell them out of ordinary pieces;
- `stop` strings from the request: the text is cut just before the first one (OpenAI semantics);
- single-line requests stop at the first newline.

While a completion runs, text that could still turn into a stop string (a tail of it that is a prefix of one)
is held back, so a streaming client never receives characters that the final answer would not contain.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"  # a decoded byte sequence that is not complete UTF-8 yet


@dataclass(frozen=True)
class StopRules:
    stop: tuple[str, ...] = ()
    single_line: bool = False
    special_text: tuple[str, ...] = ()

    @property
    def strings(self) -> tuple[str, ...]:
        extra = ("\n",) if self.single_line else ()
        return tuple(s for s in dict.fromkeys((*self.stop, *extra, *self.special_text)) if s)

    def find(self, text: str) -> int | None:
        """Index where the completion ends because of a stop string, or None."""
        best = None
        for s in self.strings:
            i = text.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
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
