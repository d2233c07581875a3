"""Fixtures for serving tests: a tiny model with input-dependent output and a real server serving it."""

from __future__ import annotations

import pytest

from refact_lab.home import Home
from tests.conftest import RunningServer
from tests.serve.helpers import build_varied_model, wait_model_ready


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory):
    return build_varied_model(tmp_path_factory.mktemp("varied_model") / "tinycoder")


@pytest.fixture(scope="session")
def reference(varied_model_dir):
    """The same model loaded in the test process: what `model.generate` says, to compare the server with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    from refact_lab.models.loading import MODEL_LOADING

    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(varied_model_dir).eval()

    def greedy(prompt: str, max_new_tokens: int, model_override=None) -> str:
        """generate()'s greedy text. A FIM prompt is token-healed as the server does it: the prefix's last token
        is dropped and generate's own constraint (prefix_allowed_tokens_fn) makes the first token continue it."""
        import torch

        from refact_lab.models.healing import heal_fim_prompt
        from refact_lab.models.registry import QWEN_FIM

        ids, healed, allowed = heal_fim_prompt(tok, QWEN_FIM, tok(prompt)["input_ids"])
        every = list(range(len(tok)))

        def allowed_tokens(_batch, sequence):
            return allowed if healed and sequence.shape[-1] == len(ids) else every

        x = torch.tensor([ids])
        with torch.no_grad():
            out = (model_override or model).generate(x, attention_mask=torch.ones_like(x),
                                                     max_new_tokens=max_new_tokens, do_sample=False,
                                                     eos_token_id=_stop_ids(tok), pad_token_id=tok.eos_token_id,
                                                     prefix_allowed_tokens_fn=allowed_tokens)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=False)
        assert text.startswith(healed)
        return text[len(healed):]

    greedy.tokenizer = tok
    greedy.model = model
    return greedy


def _stop_ids(tok):
    from refact_lab.models.registry import QWEN_FIM

    return sorted({tok.convert_tokens_to_ids(t) for t in QWEN_FIM.stop_tokens if t in tok.get_vocab()})


def cut_at_special(text: str) -> str:
    """generate() keeps the stop token in its output; the server never returns it."""
    from refact_lab.models.registry import QWEN_FIM

    for t in QWEN_FIM.stop_tokens:
        if t in text:
            text = text[:text.index(t)]
    return text.rstrip("\ufffd")


@pytest.fixture(scope="module")
def model_server(tmp_path_factory, varied_model_dir):
    home_dir = tmp_path_factory.mktemp("model_server") / "home"
    # the random test model loops all the time: these tests compare the server with plain greedy generate,
    # so the loop guard is off here (tests/serve/test_loop_guard.py checks it)
    Home.resolve(home_dir).ensure().update_settings(loop_guard=False)
    # fp32 like the reference: bf16 (the CPU default where AMX exists) would make greedy answers drift apart
    srv = RunningServer(home_dir, extra_args=["--model", str(varied_model_dir), "--dtype", "fp32"]).wait_ready()
    try:
        wait_model_ready(srv)
        yield srv
    finally:
        srv.stop()
