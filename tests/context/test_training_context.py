"""Training with repository context: examples carry snippets of OTHER train files in the served layout, never a
test file and never their own file; with context_rate 0 the packed ids are exactly those packed before."""

from __future__ import annotations

import random

import numpy as np
import pytest

from refact_lab.finetune import packing
from refact_lab.finetune.fim import file_examples
from refact_lab.models.registry import QWEN_FIM

RATES = "def convert_with_kestrel_rate(amount):\n    return amount * KESTREL_RATE\n\n\nKESTREL_RATE = 1.25\n"
MAIN = "".join(f"def price_{i}(x):\n    total = convert_with_kestrel_rate(x) + {i}\n    return total\n\n\n"
               for i in range(12))
TEST_TEXT = "def secret_test_helper_zebra(amount):\n    return convert_with_kestrel_rate(amount) - 1\n"
TRAIN = [("src/pkg/rates.py", RATES), ("src/pkg/main.py", MAIN)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from refact_lab.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _rows(tok, files, rate, epoch=0):
    return packing.train_rows(files, tok, QWEN_FIM, seq_len=512, cpt=3.0, seed=3, epoch=epoch, fim_rate=1.0,
                              context_rate=rate)


def test_context_rate_one_carries_other_train_files_never_test_or_itself(tok):
    rows = _rows(tok, TRAIN, 1.0)
    text = tok.decode(rows.tokens.reshape(-1)[:rows.n_tokens].tolist())
    assert "<|file_sep|>src/pkg/rates.py\n" in text and "<|repo_name|>" in text
    assert "secret_test_helper_zebra" not in text
    n_ctx = 0
    for example in text.split("<|repo_name|>")[1:]:
        head = example.split("<|fim_prefix|>")[0]
        paths = [part.split("\n", 1)[0] for part in head.split("<|file_sep|>")[1:]]
        own, snippet_paths = paths[-1], paths[:-1]
        assert own in dict(TRAIN) and own not in snippet_paths   # the last header is the example's own file
        n_ctx += bool(snippet_paths)
    assert n_ctx > 0
    # the main file's examples see the definition they call
    assert "<|file_sep|>src/pkg/rates.py\ndef convert_with_kestrel_rate" in text


def test_context_never_comes_from_test_files(tok):
    """Packing sees only the train files it is given: the test file's text is never retrieved into an example."""
    from refact_lab.context.training import example_snippets

    items = packing.train_items(TRAIN, seed=0, epoch=0, max_chars=300, fim_rate=1.0, context_rate=1.0)
    snippets = example_snippets(TRAIN, items, token_budget=400)
    assert any(snippets)
    for (key, _), found in zip(items, snippets):
        assert all(s.path != key and s.path in dict(TRAIN) for s in found)


def test_context_rate_zero_packs_the_ids_packed_before(tok):
    files = TRAIN + [("src/pkg/other.py", TEST_TEXT)]
    # today's epoch, written out: one random stream for the splits and the order
    rng = random.Random("train:3:0")
    examples = [ex for _, text in sorted(files)
                for ex in file_examples(text, rng, max_chars=packing.window_chars(512, 3.0), fim_rate=1.0)]
    rng.shuffle(examples)
    before = packing.examples_to_rows(examples, tok, QWEN_FIM, 512)
    now = _rows(tok, files, 0.0)
    assert np.array_equal(before.tokens, now.tokens) and np.array_equal(before.mask, now.mask)
    assert "<|file_sep|>" not in tok.decode(now.tokens.reshape(-1).tolist())
