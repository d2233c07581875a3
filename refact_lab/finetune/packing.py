"""Tokenized examples packed into fixed-length rows, with no padding.

Examples are tokenized and concatenated into one stream, which is cut into rows of exactly `seq_len` tokens.
Every position of every row is a real token, so no compute is spent on padding; an example that does not fit
the rest of a row continues in the next one. The last row is completed with tokens from the start of the
stream (they give context only: their loss mask is off, so no token is counted twice).

Attention crosses example boundaries inside a row, as in GPT-style packing: every example starts with a FIM
control token (or follows an end-of-text token), which tells the model a new document begins, and using
SDPA's plain causal kernel is much faster than a block-diagonal mask.

A row comes with a loss mask: mask[t] says whether token t is a training target (predicted from the tokens
before it in the row). Position 0 has no context, and the FIM suffix/middle markers are never targets: where
they fall is random by construction, so predicting them would only add noise to the loss.

The training rows of an epoch depend only on (seed, epoch); the test rows only on the test files (not on the
seed), so test losses are comparable across steps and across runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from refact_lab.finetune.fim import Example, file_examples
from refact_lab.models.prompt import build_fim_ids, fim_layout_ids
from refact_lab.models.registry import FimFormat, token_id

# Windows are sized in characters before tokenizing; this margin keeps an example (plus its 3–4 FIM control
# tokens) within one row even where the text tokenizes a little worse than the sample did.
WINDOW_FILL = 0.9
_ENCODE_BATCH = 256


@dataclass
class PackedRows:
    tokens: np.ndarray      # [rows, seq_len] int32 (half the memory of int64; vocabularies are far smaller)
    mask: np.ndarray        # [rows, seq_len] bool: token t is a target
    n_examples: int
    n_tokens: int           # tokens in the examples (before completing the last row)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())


def chars_per_token(tokenizer, texts: Sequence[str], sample_chars: int = 200_000) -> float:
    """Average characters per token on a deterministic sample (the first texts up to `sample_chars`)."""
    sample, size = [], 0
    for text in texts:
        if size >= sample_chars:
            break
        piece = text[: sample_chars - size]
        sample.append(piece)
        size += len(piece)
    if not size:
        return 3.0
    n_tokens = sum(len(ids) for ids in _encode(tokenizer, sample))
    return max(0.5, size / max(1, n_tokens))


def window_chars(seq_len: int, cpt: float) -> int:
    return max(16, int(seq_len * cpt * WINDOW_FILL))


def _encode(tokenizer, texts: Sequence[str], content: bool = False) -> list[list[int]]:
    """Token ids of each text; `content`: special-token names written in the text stay text."""
    out: list[list[int]] = []
    for i in range(0, len(texts), _ENCODE_BATCH):
        batch = list(texts[i:i + _ENCODE_BATCH])
        out.extend(tokenizer(batch, add_special_tokens=False, split_special_tokens=content,
                             verbose=False)["input_ids"])
    return out


def example_ids(examples: Sequence[Example], tokenizer, fmt: FimFormat, contexts: Sequence[tuple] | None = None,
                seq_len: int | None = None) -> list[list[int]]:
    """Token ids of each example as `Example.text` lays it out, with the code encoded as content and the FIM
    markers and end token inserted by id: a file that spells "<|endoftext|>" or a FIM marker (a tokenizer's own
    source) trains as the text it is, not as a document end or a second hole. A format whose markers are not
    single tokens falls back to tokenizing the joined text.

    `contexts`: per example (its file's path, snippets of other files); an example with snippets is laid out by
    the prompt builder exactly as served, the snippets filling what `seq_len` leaves after the example."""
    markers, eot = fmt.marker_ids(tokenizer), token_id(tokenizer, fmt.eot)
    if markers is None or eot is None:
        return _encode(tokenizer, [ex.text(fmt) for ex in examples])
    enc = _encode(tokenizer, [piece for ex in examples for piece in (ex.prefix, ex.suffix, ex.middle)], content=True)
    out = []
    for i, ex in enumerate(examples):
        pre, suf, mid = enc[3 * i:3 * i + 3]
        if ex.kind == "plain":
            out.append(pre + [eot])
        elif contexts and contexts[i][1]:
            path, snippets = contexts[i]
            prompt = build_fim_ids(tokenizer, fmt, ex.prefix, ex.suffix, snippets, path=path,
                                   fit_tokens=(seq_len or 0) - len(mid) - 1).ids
            out.append(prompt + mid + [eot])
        else:
            # the prompt the server builds (models/prompt.py), then the middle the model learns to write
            out.append(fim_layout_ids(fmt, markers, pre, suf) + mid + [eot])
    return out


def control_token_ids(tokenizer, fmt: FimFormat) -> set[int]:
    """Ids of the FIM suffix and middle markers (when each is a single token)."""
    ids = set()
    for marker in (fmt.suffix, fmt.middle):
        enc = tokenizer.encode(marker, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
    return ids


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, no_target: set[int] = frozenset()) -> PackedRows:
    """Concatenate token lists and cut into rows of `seq_len`; see the module docstring for the mask."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    lengths = [len(t) for t in token_lists]
    n_tokens = int(sum(lengths))
    if n_tokens == 0:
        return PackedRows(np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), bool), 0, 0)
    stream = np.fromiter((tok for ids in token_lists for tok in ids), dtype=np.int32, count=n_tokens)
    target = np.ones(n_tokens, dtype=bool)
    if no_target:
        target &= ~np.isin(stream, np.fromiter(no_target, dtype=np.int32))
    n_rows = -(-n_tokens // seq_len)
    fill = n_rows * seq_len - n_tokens
    if fill:
        # complete the last row from the start of the stream (repeating it if the stream is tiny)
        reps = -(-fill // n_tokens)
        stream = np.concatenate([stream, np.tile(stream, reps)[:fill]])
        target = np.concatenate([target, np.zeros(fill, dtype=bool)])
    tokens = stream.reshape(n_rows, seq_len)
    mask = target.reshape(n_rows, seq_len).copy()
    mask[:, 0] = False
    return PackedRows(tokens, mask, len(token_lists), n_tokens)


def examples_to_rows(examples: Sequence[Example], tokenizer, fmt: FimFormat, seq_len: int) -> PackedRows:
    ids = example_ids(examples, tokenizer, fmt)
    return pack(ids, seq_len, control_token_ids(tokenizer, fmt))


def train_items(files: Sequence[tuple[str, str]], *, seed: int, epoch: int, max_chars: int, fim_rate: float,
                context_rate: float = 0.0) -> list[tuple[str, Example]]:
    """(file key or "", example) of one training epoch: fresh FIM splits and order for every (seed, epoch).
    A file drawn for repository context (probability `context_rate`, from its own random stream so that with
    0 nothing changes) is keyed and cut into half-size windows: its examples leave room for the snippets."""
    rng, pick = random.Random(f"train:{seed}:{epoch}"), random.Random(f"context:{seed}:{epoch}")
    items: list[tuple[str, Example]] = []
    for key, text in sorted(files):
        ctx = context_rate > 0 and pick.random() < context_rate
        items.extend((key if ctx else "", ex) for ex in file_examples(
            text, rng, max_chars=max(16, max_chars // 2) if ctx else max_chars, fim_rate=fim_rate))
    rng.shuffle(items)
    return items


def train_examples(files: Sequence[tuple[str, str]], *, seed: int, epoch: int, max_chars: int,
                   fim_rate: float) -> list[Example]:
    """The examples of one training epoch (without repository context)."""
    return [ex for _, ex in train_items(files, seed=seed, epoch=epoch, max_chars=max_chars, fim_rate=fim_rate)]


def test_examples(files: Sequence[tuple[str, str]], *, max_chars: int, fim_rate: float) -> list[Example]:
    """The test examples: each file's splits come from its own name, so they never change between runs."""
    examples: list[Example] = []
    for key, text in sorted(files):
        examples.extend(file_examples(text, random.Random(f"test:{key}"), max_chars=max_chars, fim_rate=fim_rate))
    return examples


def train_rows(files, tokenizer, fmt: FimFormat, *, seq_len: int, cpt: float, seed: int, epoch: int,
               fim_rate: float, context_rate: float = 0.0) -> PackedRows:
    """The packed rows of one epoch; `context_rate` of the files train with snippets of other TRAIN files
    (refact_lab.context.training) in the served repository layout."""
    items = train_items(files, seed=seed, epoch=epoch, max_chars=window_chars(seq_len, cpt), fim_rate=fim_rate,
                        context_rate=context_rate)
    examples = [ex for _, ex in items]
    if context_rate <= 0:
        return examples_to_rows(examples, tokenizer, fmt, seq_len)
    from refact_lab.context.training import example_snippets

    contexts = list(zip((key for key, _ in items), example_snippets(files, items, token_budget=seq_len // 2)))
    return pack(example_ids(examples, tokenizer, fmt, contexts, seq_len), seq_len, control_token_ids(tokenizer, fmt))


def test_rows(files, tokenizer, fmt: FimFormat, *, seq_len: int, cpt: float, fim_rate: float,
              max_rows: int) -> PackedRows:
    """Packed test rows; when there are more than `max_rows`, evenly spaced rows are kept so every part of
    the test set is represented."""
    rows = examples_to_rows(test_examples(files, max_chars=window_chars(seq_len, cpt), fim_rate=fim_rate),
                            tokenizer, fmt, seq_len)
    if len(rows) > max_rows:
        keep = np.unique(np.linspace(0, len(rows) - 1, max_rows).round().astype(int))
        rows = PackedRows(rows.tokens[keep], rows.mask[keep], rows.n_examples, rows.n_tokens)
    return rows
