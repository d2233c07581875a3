"""Packing: fixed-length rows with no padding, masks that skip FIM markers, a test set that never changes."""

import numpy as np
import pytest

from refact_lab.finetune import packing
from refact_lab.finetune.fim import Example
from refact_lab.models.registry import QWEN_FIM
from tests.finetune.conftest import STDLIB, TEST_FILES, TRAIN_FILES


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from refact_lab.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _files(names):
    return [(n, (STDLIB / n).read_text()) for n in names]


def test_pack_fills_every_row_and_keeps_the_stream_in_order():
    lists = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    rows = packing.pack(lists, seq_len=4)
    assert rows.tokens.shape == (4, 4)                      # 13 tokens -> 4 rows, the last completed
    flat = rows.tokens.reshape(-1)
    assert flat[:13].tolist() == list(range(1, 14))
    assert flat[13:].tolist() == [1, 2, 3]                  # completed from the start of the stream...
    assert not rows.mask.reshape(-1)[13:].any()             # ...which is context only, never a target twice
    assert not rows.mask[:, 0].any()                        # the first token of a row has no context
    assert rows.n_targets == 13 - 4                         # every real token but the 4 row starts


def test_pack_never_targets_fim_markers():
    rows = packing.pack([[5, 100, 6, 200, 7, 8]], seq_len=6, no_target={100, 200})
    assert rows.mask[0].tolist() == [False, False, True, False, True, True]   # 100 and 200 are never targets


def test_rows_from_real_files_waste_less_than_one_row(tokenizer):
    files = _files(TRAIN_FILES[:6])
    cpt = packing.chars_per_token(tokenizer, [t for _, t in files])
    rows = packing.train_rows(files, tokenizer, QWEN_FIM, seq_len=128, cpt=cpt, seed=0, epoch=0, fim_rate=0.9)
    assert rows.tokens.shape[1] == 128
    assert rows.n_tokens > (len(rows) - 1) * 128            # at most one row is partly reused tokens
    # the rows hold FIM-formatted text in the model's order (prefix, suffix, middle)
    text = tokenizer.decode(rows.tokens.reshape(-1)[:rows.n_tokens].tolist())
    assert text.count("<|fim_prefix|>") == text.count("<|fim_suffix|>") == text.count("<|fim_middle|>") > 0
    first = text.index("<|fim_prefix|>")
    assert first < text.index("<|fim_suffix|>", first) < text.index("<|fim_middle|>", first)
    assert text.count("<|endoftext|>") == rows.n_examples
    # FIM markers are never loss targets
    markers = packing.control_token_ids(tokenizer, QWEN_FIM)
    assert len(markers) == 2
    assert not rows.mask[np.isin(rows.tokens, list(markers))].any()


def test_encoding_pieces_matches_how_the_server_tokenizes_a_prompt(tokenizer):
    ex = Example("inline", prefix="def add(a, b):\n    return a", suffix=" # sum\n", middle=" + b")
    rows = packing.examples_to_rows([ex], tokenizer, QWEN_FIM, seq_len=8)
    ids = tokenizer(ex.text(QWEN_FIM), add_special_tokens=False)["input_ids"]
    assert rows.tokens.reshape(-1)[:len(ids)].tolist() == ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|fim_prefix|>")


def test_code_that_spells_special_tokens_trains_as_text(tokenizer):
    """A tokenizer's own source spells "<|endoftext|>" and the FIM markers: they must not become a document end
    or a second hole in the middle of a training example."""
    code = 'EOT = "<|endoftext|>"\nMIDDLE = "<|fim_middle|>"\n'
    examples = [Example("inline", prefix=code + "x = ", suffix="\n" + code, middle="1"), Example("plain", prefix=code)]
    rows = packing.examples_to_rows(examples, tokenizer, QWEN_FIM, seq_len=512)
    ids = rows.tokens.reshape(-1)[:rows.n_tokens].tolist()
    count = {t: ids.count(tokenizer.convert_tokens_to_ids(t)) for t in ("<|endoftext|>", "<|fim_middle|>",
                                                                        "<|fim_prefix|>", "<|fim_suffix|>")}
    assert count == {"<|endoftext|>": 2, "<|fim_middle|>": 1, "<|fim_prefix|>": 1, "<|fim_suffix|>": 1}
    assert tokenizer.decode(ids) == examples[0].text(QWEN_FIM) + examples[1].text(QWEN_FIM)


def test_test_rows_are_deterministic_and_train_rows_change_with_the_epoch(tokenizer):
    train, test = _files(TRAIN_FILES[:4]), _files(TEST_FILES)
    kw = dict(seq_len=64, cpt=2.0, fim_rate=0.9)
    a = packing.test_rows(test, tokenizer, QWEN_FIM, max_rows=1000, **kw)
    b = packing.test_rows(list(reversed(test)), tokenizer, QWEN_FIM, max_rows=1000, **kw)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    e0 = packing.train_rows(train, tokenizer, QWEN_FIM, seed=1, epoch=0, **kw)
    e0_again = packing.train_rows(train, tokenizer, QWEN_FIM, seed=1, epoch=0, **kw)
    e1 = packing.train_rows(train, tokenizer, QWEN_FIM, seed=1, epoch=1, **kw)
    assert np.array_equal(e0.tokens, e0_again.tokens)
    assert e0.tokens.shape != e1.tokens.shape or not np.array_equal(e0.tokens, e1.tokens)


def test_test_rows_cap_keeps_evenly_spaced_rows(tokenizer):
    test = _files(TEST_FILES)
    full = packing.test_rows(test, tokenizer, QWEN_FIM, seq_len=64, cpt=2.0, fim_rate=0.9, max_rows=10_000)
    capped = packing.test_rows(test, tokenizer, QWEN_FIM, seq_len=64, cpt=2.0, fim_rate=0.9, max_rows=5)
    assert len(capped) == 5 < len(full)
    assert np.array_equal(capped.tokens[0], full.tokens[0]) and np.array_equal(capped.tokens[-1], full.tokens[-1])
