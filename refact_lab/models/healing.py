"""Token healing for FIM prompts: let the model choose how the text at the cursor continues.

An IDE cursor often sits inside a word ("    ret|"). The prefix then ends in a token (" ret") that byte-level
BPE almost never produces before "urn": the finished line would be tokenized " return". Healing drops that
last prefix token from the prompt and makes the first generated token start with its text, so the model sees
the line the way it saw code in training. The removed text is not part of the completion returned.

The same holds after whitespace. At a fresh line's indentation ("):\n        |") the prefix ends in the token
"\n        ", which training only saw before a blank line: with code after it, the text is "\n       " +
" self". After "s = |" the prefix ends in " ", a token training saw only before more whitespace. Healing cuts
the prompt at the cursor's token boundary (`refact_lab.models.boundary`, the definition FIM training splits
use too), re-encodes what lies between the removed tokens and that boundary, and makes the first token start
with the rest; where that rest ends in whitespace, the first token must put code after it, so a completion
never starts with indentation the line already has.

Used by the serving engine (every FIM-shaped prompt, whoever built it) and by the reference greedy decoder.
"""

from __future__ import annotations

import bisect
import weakref

from refact_lab.models.boundary import cursor_boundary
from refact_lab.models.registry import FimFormat, content_ids

_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_VOCABS_BY_ID: dict[int, "Vocabulary"] = {}


class Vocabulary:
    """Decoded text of every token, sorted so the tokens starting with a string are one bisect away."""

    def __init__(self, tok):
        n = len(tok)
        # one Rust call for the whole vocabulary (150k tokens in about a second; 4k in milliseconds)
        self.texts: list[str] = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                                 clean_up_tokenization_spaces=False)
        self.special = set(tok.all_special_ids)
        self.concatenates = _decodes_by_concatenation(tok, self.texts, self.special)
        pairs = sorted((t, i) for i, t in enumerate(self.texts) if i not in self.special and t)
        self._sorted_texts = [t for t, _ in pairs]
        self._sorted_ids = [i for _, i in pairs]

    def starting_with(self, text: str) -> list[int]:
        lo = bisect.bisect_left(self._sorted_texts, text)
        hi = bisect.bisect_left(self._sorted_texts, text + "\U0010ffff")
        return self._sorted_ids[lo:hi]


def _decodes_by_concatenation(tok, texts: list[str], special: set[int]) -> bool:
    """Whether decoding a sequence gives the concatenated texts of its tokens (byte-level BPE: Qwen, StarCoder,
    DeepSeek). SentencePiece vocabularies drop a word's leading space when a token is decoded alone, so a token's
    text says nothing reliable about what it adds mid-line: healing is off for them."""
    # tokens holding part of a UTF-8 character decode alone as U+FFFD: they say nothing either way
    ids = [i for i in range(0, len(texts), max(1, len(texts) // 400))
           if i not in special and texts[i] and "\ufffd" not in texts[i]][:200]
    for a, b in zip(ids, reversed(ids)):
        if tok.decode([a, b], skip_special_tokens=False, clean_up_tokenization_spaces=False) != texts[a] + texts[b]:
            return False
    return True


def vocabulary(tok) -> Vocabulary:
    """The Vocabulary of this tokenizer object, built once."""
    try:
        v = _VOCABS.get(tok)
    except TypeError:  # not weak-referenceable: key by id (tokenizers live as long as their model)
        v = _VOCABS_BY_ID.get(id(tok))
    if v is None:
        v = Vocabulary(tok)
        try:
            _VOCABS[tok] = v
        except TypeError:
            _VOCABS_BY_ID[id(tok)] = v
    return v


HEAL_TOKENS = 8  # the prefix's last tokens read to find the cursor's boundary


def heal_fim_prompt(tok, fim: FimFormat, prompt_ids: list[int]) -> tuple[list[int], str, list[int]]:
    """(prompt cut at the cursor's token boundary, the text between that boundary and the cursor, the token ids
    the completion may start with).

    Only a FIM prompt asking for the middle (ending in the middle token) is healed; anything else, a prefix
    whose boundary is the cursor itself (after a newline or a tab), a special token or a partial UTF-8
    character near the cursor, is returned unchanged with ("", []).
    """
    unchanged = (prompt_ids, "", [])
    markers = fim.marker_ids(tok)
    if markers is None or not prompt_ids or prompt_ids[-1] != markers[2]:
        return unchanged
    prefix_id = markers[0]
    end = fim.cursor_index(prompt_ids, markers)
    if end is None or prefix_id not in prompt_ids:
        return unchanged
    start = prompt_ids.index(prefix_id)
    if end - start < 2:  # an empty prefix, or only one token: nothing to heal
        return unchanged
    vocab = vocabulary(tok)
    if not vocab.concatenates:
        return unchanged
    tail_ids = prompt_ids[max(start + 1, end - HEAL_TOKENS):end]
    texts = [vocab.texts[i] if i < len(vocab.texts) else "" for i in tail_ids]
    if any(i in vocab.special or not t or "\ufffd" in t for i, t in zip(tail_ids, texts)):
        return unchanged
    tail = "".join(texts)
    cut = cursor_boundary(tail)
    if cut == len(tail) or cut == 0:  # the cursor is a boundary already, or the chunk is longer than the tail
        return unchanged
    # Drop the tokens that reach past the boundary; the part of them before it is encoded again as content. When
    # no token starts with the whole text after the boundary (a word the vocabulary splits, " Soft" = " So" +
    # "ft"), the cut moves forward to the next token start that some token continues.
    starts = [len(tail) - sum(len(t) for t in texts[j:]) for j in range(len(texts))]
    for cut in [cut] + [p for p in starts if p > cut]:
        healed = tail[cut:]
        allowed = vocab.starting_with(healed)
        if healed[-1].isspace():
            # the text at the cursor is code: after the healed space comes something else than more whitespace
            n = len(healed)
            allowed = [i for i in allowed if len(vocab.texts[i]) > n and not vocab.texts[i][n].isspace()]
        if allowed:
            break
    else:
        return unchanged
    # the last k tokens end after the cut: they go, and what they held before the cut is encoded again
    k = sum(1 for j, t in enumerate(texts) if starts[j] + len(t) > cut)
    kept = tail[starts[len(texts) - k]:cut]
    kept_ids = content_ids(tok, kept) if kept else []
    return prompt_ids[:end - k] + kept_ids + prompt_ids[end:], healed, allowed
