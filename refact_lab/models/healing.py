"""Token healing for FIM prompts: let the model choose how the word under the cursor continues.

An IDE cursor often sits inside a word ("    ret|"). The prefix then ends in a token (" ret") that byte-level
BPE almost never produces before "urn": the finished line would be tokenized " return". Healing drops that
last prefix token from the prompt and makes the first generated token start with its text, so the model sees
the line the way it saw code in training. The removed text is not part of the completion returned.

Used by the serving engine (every FIM-shaped prompt, whoever built it) and by the reference greedy decoder.
"""

from __future__ import annotations

import bisect
import weakref

from refact_lab.models.registry import FimFormat

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


def heal_fim_prompt(tok, fim: FimFormat, prompt_ids: list[int]) -> tuple[list[int], str, list[int]]:
    """(prompt without the prefix's last token, that token's text, the token ids the completion may start with).

    Only a FIM prompt asking for the middle (ending in the middle token) is healed; anything else, a prefix that
    ends at a line break or a special token, or a partial UTF-8 character, is returned unchanged with ("", []).
    """
    unchanged = (prompt_ids, "", [])
    markers = fim.marker_ids(tok)
    if markers is None or not prompt_ids or prompt_ids[-1] != markers[2]:
        return unchanged
    prefix_id, suffix_id, _ = markers
    # the prefix ends just before the suffix token (PSM) or just before the final middle token (SPM)
    try:
        start = prompt_ids.index(prefix_id)
        end = prompt_ids.index(suffix_id) if fim.order == "psm" else len(prompt_ids) - 1
    except ValueError:
        return unchanged
    if end - start < 2:  # an empty prefix, or only one token: nothing to heal
        return unchanged
    vocab = vocabulary(tok)
    if not vocab.concatenates:
        return unchanged
    last = prompt_ids[end - 1]
    text = vocab.texts[last] if last < len(vocab.texts) else ""
    if not text or "\n" in text or "\ufffd" in text or last in vocab.special:
        return unchanged
    allowed = vocab.starting_with(text)
    if not allowed:
        return unchanged
    return prompt_ids[:end - 1] + prompt_ids[end:], text, allowed
