"""resolve(): registry names, the embedded default, and local folders recognised by their FIM tokens."""

from __future__ import annotations

import json

import pytest

from refact_lab.models.registry import (DEFAULT_MODEL, EMBEDDED_DIR, QWEN_FIM, STARCODER_FIM, KNOWN_MODELS,
                                        resolve)


def _folder(tmp_path, name, special_tokens, via_transformers=False, n_ctx=1234):
    """A model folder with a config.json and an (untrained) BPE tokenizer knowing `special_tokens`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": n_ctx}))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(special_tokens)
    if via_transformers:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special_tokens[-1]).save_pretrained(str(folder))
    else:
        tok.save(str(folder / "tokenizer.json"))
    return folder


def test_default_and_none_resolve_to_the_embedded_folder():
    assert resolve(None) is resolve(DEFAULT_MODEL) is KNOWN_MODELS[DEFAULT_MODEL]
    spec = resolve(None)
    assert spec.source == str(EMBEDDED_DIR) and spec.is_embedded and spec.is_local
    assert spec.fim == QWEN_FIM
    assert (EMBEDDED_DIR / "config.json").is_file() and (EMBEDDED_DIR / "model.safetensors").is_file()


def test_embedded_folder_by_path_is_recognised_as_qwen_fim():
    spec = resolve(str(EMBEDDED_DIR))
    assert (spec.fim.prefix, spec.fim.suffix, spec.fim.middle, spec.fim.eot) == (
        "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>")


@pytest.mark.parametrize("via_transformers", [False, True])
def test_local_starcoder_style_folder(tmp_path, via_transformers):
    folder = _folder(tmp_path, "sc", ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<|endoftext|>"],
                     via_transformers)
    spec = resolve(str(folder))
    assert spec.fim.prefix == STARCODER_FIM.prefix and spec.fim.middle == "<fim_middle>"
    assert spec.fim.eot == "<|endoftext|>"
    assert spec.fim.extra_stops == ("<fim_pad>",)  # <file_sep> is not in this vocabulary
    assert spec.n_ctx == 1234 and spec.is_local and spec.source == str(folder.resolve())
    assert spec.fim.prompt("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"


@pytest.mark.parametrize("via_transformers", [False, True])
def test_local_qwen_style_folder(tmp_path, via_transformers):
    folder = _folder(tmp_path, "qw", ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endoftext|>"],
                     via_transformers, n_ctx=99999)
    spec = resolve(str(folder))
    assert spec.fim.prefix == "<|fim_prefix|>" and spec.fim.eot == "<|endoftext|>"
    assert spec.fim.extra_stops == ()
    assert spec.n_ctx == 32768  # capped


def test_local_folder_without_fim_tokens_or_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no FIM tokens"):
        resolve(str(_folder(tmp_path, "plain", ["<|endoftext|>"])))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve(str(empty))
