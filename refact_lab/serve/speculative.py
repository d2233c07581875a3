"""Prompt-lookup drafts for speculative decoding: guesses of the next tokens copied from the text itself.

Code completion copies a lot from its own prompt (identifiers, repeated lines, the shape of the previous
function). When the last few tokens appeared before, the tokens that followed them then are a cheap guess of
what follows now. The engine feeds the guesses to the model in one forward pass and keeps the longest prefix
the model agrees with (its greedy choice at every position), plus the model's own next token; so the output is
the greedy output, whatever the guess. No draft model: a wrong guess costs only the extra columns of one pass.
"""

from __future__ import annotations

from typing import Sequence


def _newest_match(seq: Sequence[int], ids: Sequence[int], max_ngram: int, before: int) -> tuple[int, int]:
    """(end, n): the newest position `end` < `before` of `seq` where the last n tokens of `ids` end, n as large as
    possible up to max_ngram; (-1, 0) when the last token of `ids` does not occur there."""
    total = len(ids)
    last = ids[-1]
    best_end, best_n = -1, 0
    # one pass, newest first: the latest occurrence is the likeliest to continue the same way (the current block)
    for end in range(before - 1, -1, -1):
        if seq[end] != last:
            continue
        n = 1
        while n < max_ngram and end - n >= 0 and n < total and seq[end - n] == ids[total - 1 - n]:
            n += 1
        if n > best_n:
            best_end, best_n = end, n
            if n == max_ngram:
                break
    return best_end, best_n


def draft(ids: Sequence[int], k: int, max_ngram: int = 3, history: Sequence[int] = ()) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens of `ids`
    (n = max_ngram, falling back to shorter n-grams); [] when none of them occurred before.

    `history`: the completion the engine gave to the stored prompt nearest to this one (serve/prefix_cache.py).
    An IDE asks again after every keystroke, and when the user types what was suggested, the new completion is
    the rest of the previous one. A match there wins over an equally long one in the text itself."""
    if k <= 0 or len(ids) < 2:
        return []
    if history:
        end, n = _newest_match(history, ids, max_ngram, len(history) - 1)  # a match at the very end drafts nothing
    else:
        end, n = -1, 0
    own_end, own_n = _newest_match(ids, ids, max_ngram, len(ids) - 1)
    if n and n >= own_n:
        return list(history[end + 1:end + 1 + k])
    return list(ids[own_end + 1:own_end + 1 + k]) if own_n else []


def agreed(drafts: Sequence[int], predicted: Sequence[int]) -> int:
    """How many leading drafts equal the model's greedy choices (predicted[i] follows the i-th fed token)."""
    n = 0
    while n < len(drafts) and predicted[n] == drafts[n]:
        n += 1
    return n
