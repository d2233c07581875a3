"""Fine-tuning helps: a short CPU LoRA run of the default model on an unseen repository lowers its test loss.

The repository is generated here: a made-up domain (its own identifiers, helper names and docstring style) the
default model cannot have seen, split by file into train and test. If LoRA learns anything that carries over
between files of one repository, the loss on the test files falls.
"""

from __future__ import annotations

import random

import pytest

WORDS = ["zorb", "quill", "frond", "glim", "vexa", "tamber", "orlo", "pindle", "wisk", "brumb"]


def _generated_repo(n_files: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    files = []
    for i in range(n_files):
        lines = [f'"""Module {i}: {rng.choice(WORDS)} {rng.choice(WORDS)} handlers."""', "",
                 "from glimworks.core import quillify, frondset, Vexa", ""]
        for _ in range(6):
            a, b = rng.sample(WORDS, 2)
            n = rng.randint(2, 9)
            lines += [
                f"def {a}_{b}_handler(payload, depth={n}):",
                f'    """Quillify the {a} payload into a {b} frondset."""',
                f"    vexa = Vexa(payload, mode=\"{b}\")",
                "    for step in range(depth):",
                f"        vexa = quillify(vexa, step, tag=\"{a}\")",
                f"    return frondset(vexa, {a.upper()}_{b.upper()}_LIMIT)",
                "",
            ]
        files.append("\n".join(lines) + "\n")
    return files


def _rows(tok, texts: list[str], length: int):
    """Pack the files (separated by <|endoftext|>) into rows of `length` tokens."""
    import torch

    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_special_tokens=False) + [eot]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def _loss(model, rows) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float(model(input_ids=rows, labels=rows).loss)


@pytest.mark.slow
def test_lora_finetune_lowers_test_loss_on_an_unseen_repository():
    import torch

    from refact_lab.models.registry import resolve

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # One thread: for a model this small a second one mostly waits (and the CI machine is shared).
    torch.set_num_threads(1)
    try:
        before, after = _finetune(resolve(None))
    finally:
        torch.set_num_threads(threads)
    # A meaningful drop, not noise: the generated repository is very regular, so LoRA should cut it a lot.
    assert after < 0.7 * before, (before, after)


def _finetune(spec) -> tuple[float, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.source)
    model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=torch.float32)
    files = _generated_repo(24, seed=1)
    train, test = _rows(tok, files[:18], 128), _rows(tok, files[18:], 128)
    assert len(train) >= 8 and len(test) >= 2

    before = _loss(model, test)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=list(spec.lora_targets), task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.2 * sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(20):
        batch = train[torch.randint(len(train), (4,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _loss(model, test)
    print(f"test loss {before:.3f} -> {after:.3f}")
    return before, after
