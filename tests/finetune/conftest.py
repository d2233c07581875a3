"""Fixtures for fine-tuning tests: a learnable tiny model and a dataset made of real standard-library files.

The dataset is laid out the way the scan leaves it: files under projects/<p>/sources/<source>/ and one
record per accepted file in projects/<p>/scan/accepted.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from refact_lab.models.loading import MODEL_LOADING

STDLIB = Path(os.__file__).parent
# A slice of the standard library: ordinary, well-written Python (the kind of code a team fine-tunes on).
TRAIN_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "html/__init__.py",
               "textwrap.py", "string.py", "colorsys.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py",
               "keyword.py", "copy.py", "numbers.py", "stat.py"]
TEST_FILES = ["queue.py", "sched.py", "genericpath.py"]


def write_dataset(home, project: str, files: dict[str, list[str]], source: str = "stdlib",
                  root: Path = STDLIB) -> Path:
    """Copy `files` ({"train": [...], "test": [...]}, paths relative to `root`) into a project's sources and
    write its accepted.jsonl. Returns the accepted.jsonl path."""
    src = home.sources_dir(project) / source
    records = []
    for which, names in files.items():
        for name in names:
            data = (root / name).read_bytes()
            target = src / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            records.append({"path": name, "source": source, "sha256": hashlib.sha256(data).hexdigest(),
                            "size": len(data), "language": "Python", "set": which})
    (src / "source.json").write_text(json.dumps({"kind": "folder", "url": str(root), "set": "train"}))
    scan = home.scan_dir(project)
    scan.mkdir(parents=True, exist_ok=True)
    path = scan / "accepted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_learnable_model(folder: Path, *, hidden: int = 64, layers: int = 2, vocab: int = 512,
                          n_ctx: int = 512, init: float = 0.1) -> Path:
    """A random-initialised tiny Llama whose output layer can express a real distribution.

    With the usual initializer_range of 0.02 and tied embeddings, a 64-wide model's logits can only spread
    by about +-1 after the final norm, so no LoRA can move its loss far from uniform; 0.1 lifts that cap.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from refact_lab.models.registry import QWEN_FIM
    from refact_lab.models.tokenizer_build import save_as_transformers, train_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer([(STDLIB / n).read_text() for n in TRAIN_FILES[:6]], vocab_size=vocab)
    save_as_transformers(tok, folder, model_max_length=n_ctx)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=n_ctx, tie_word_embeddings=True,
        initializer_range=init, bos_token_id=None, eos_token_id=tok.token_to_id(QWEN_FIM.eot),
        pad_token_id=tok.token_to_id(QWEN_FIM.eot))
    with MODEL_LOADING:
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory):
    return build_learnable_model(tmp_path_factory.mktemp("learnable_model"))


@pytest.fixture
def stdlib_project(home):
    """Project "stdlib": 16 training files and 3 held-out test files from the standard library."""
    write_dataset(home, "stdlib", {"train": TRAIN_FILES, "test": TEST_FILES})
    return "stdlib"


def quick_settings(**changes):
    """Settings for a run that takes seconds on a busy 2-core CPU."""
    from refact_lab.config import FinetuneSettings

    base = dict(seq_len=128, batch_size=4, train_steps=12, eval_every=4, checkpoint_every=4, learning_rate=1e-2,
                lora_r=8, lora_alpha=16, lora_dropout=0.0, max_test_rows=8, early_stop_patience=0)
    base.update(changes)
    return FinetuneSettings(**base)


@pytest.fixture(autouse=True)
def one_cpu_thread(monkeypatch):
    """Tiny models gain nothing from intra-op threads, and on a shared CPU a second thread that waits for a
    busy core made steps several times slower; run processes inherit the setting through OMP_NUM_THREADS."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
