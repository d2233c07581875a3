"""Prompt-lookup drafts for speculative decoding: guesses of the next tokens copied from the text itself.

Code completion copies a lot from its own prompt (identifiers, repeated lines, the shape of the previous
function). When the last few tokens appeared before, the tokens that followed them then are a cheap guess of
what follows now. The engine feeds the guesses to the model in one forward pass and keeps the longest prefix
the model agrees with (its greedy choice at every position), plus the model's own next token; so the output is
the greedy output, whatever the guess. No draft model: a wrong guess costs only the extra columns of one pass.
"""

from __future__ import annotations

from typing import Sequence


def draft(ids: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens of `ids`
    (n = max_ngram, falling back to shorter n-grams); [] when none of them occurred before."""
    total = len(ids)
    if k <= 0 or total < 2:
        return []
    last = ids[-1]
    best_end, best_n = -1, 0  # the newest occurrence of the longest matching tail seen so far
    # one pass, newest first: the latest occurrence is the likeliest to continue the same way (the current block)
    for end in range(total - 2, -1, -1):
        if ids[end] != last:
            continue
        n = 1
        while n < max_ngram and end - n >= 0 and ids[end - n] == ids[total - 1 - n]:
            n += 1
        if n > best_n:
            best_end, best_n = end, n
            if n == max_ngram:
                break
    return list(ids[best_end + 1:best_end + 1 + k]) if best_n else []

def agreed(drafts: Sequence[int], predicted: Sequence[int]) -> int:
    """How many leading drafts equal the model's greedy choices (predicted[i] follows the i-th fed token)."""
    n = 0
    while n < len(drafts) and predicted[n] == drafts[n]:
        n += 1
    return n
