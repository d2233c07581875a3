"""Greedy FIM completion with the KV cache: a small reference decoder for benches, tests and quick checks.

The server has its own engine (batching, sampling, LoRA switching); this is the plain loop that says what a
model completes at a cursor, one token at a time, so numbers like FIM exact match do not depend on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from refact_lab.models.healing import heal_fim_prompt
from refact_lab.models.prompt import build_fim_ids
from refact_lab.models.registry import FimFormat


@dataclass
class Completion:
    text: str
    n_tokens: int          # tokens generated, the stop token included
    stopped: str           # "newline", "stop_token" or "length"
    prompt_tokens: int


def fim_prompt_ids(tok, fim: FimFormat, prefix: str, suffix: str, max_prompt_tokens: int | None,
                   prefix_share: float = 0.75, snippets=(), path: str = "") -> list[int]:
    """Token ids of the FIM prompt, keeping the end of the prefix and the start of the suffix when too long
    (`max_prompt_tokens` None: never cut); context `snippets` go before the cursor's file. Built by the one
    prompt builder (models/prompt.py), so this decoder sees what training and the server lay out."""
    return build_fim_ids(tok, fim, prefix, suffix, snippets, max_prompt_tokens=max_prompt_tokens, path=path,
                         prefix_share=prefix_share).ids


def greedy_complete(model, tok, prompt_ids: list[int], *, max_new_tokens: int = 32, stop_ids=(),
                    stop_at_newline: bool = True, healed: str = "", allowed_first=()) -> Completion:
    """Greedy decoding with the KV cache; stops at a stop token, at a newline (optional) or at the limit.

    `healed`: text of the prompt token removed by token healing; the first token is one of `allowed_first`
    (tokens starting with that text), and the healed text is not part of the returned text. With stop_ids=()
    and stop_at_newline=False it always produces max_new_tokens (what a latency test wants).
    """
    import torch

    stop_ids = set(stop_ids)
    device = next(model.parameters()).device
    cache_kw = _cache_keyword(model)
    out: list[int] = []
    text = ""
    stopped = "length"
    with torch.inference_mode():
        # Only the last position's logits are needed: skipping the others saves the prompt x vocab matmul.
        result = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        for i in range(max_new_tokens):
            logits = result.logits[0, -1]
            if i == 0 and allowed_first:
                nxt = allowed_first[int(logits[list(allowed_first)].argmax())]
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            if nxt in stop_ids:
                stopped = "stop_token"
                out.pop()
                break
            if stop_at_newline:
                text = tok.decode(out, skip_special_tokens=False)[len(healed):]
                if "\n" in text:
                    text = text[:text.index("\n")]
                    stopped = "newline"
                    break
            cache = result.get("cache")
            cache = result.get("past_key_values") if cache is None else cache
            result = model(input_ids=torch.tensor([[nxt]], device=device), use_cache=True, **{cache_kw: cache})
    if stopped != "newline":
        text = tok.decode(out, skip_special_tokens=False)[len(healed):]
    return Completion(text=text, n_tokens=len(out) + (stopped == "stop_token"), stopped=stopped,
                      prompt_tokens=len(prompt_ids))


def _cache_keyword(model) -> str:
    """transformers 5 renamed the forward argument `past_key_values` to `cache` (the old name warns)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def complete_at_cursor(model, tok, fim: FimFormat, prefix: str, suffix: str, *, max_new_tokens: int = 32,
                       max_prompt_tokens: int = 448, single_line: bool = True, heal: bool = True) -> Completion:
    """What the model writes at the cursor between `prefix` and `suffix` (greedy, token healing optional)."""
    prompt = fim_prompt_ids(tok, fim, prefix, suffix, max_prompt_tokens)
    healed, allowed = "", []
    if heal:
        prompt, healed, allowed = heal_fim_prompt(tok, fim, prompt)
    return greedy_complete(model, tok, prompt, max_new_tokens=max_new_tokens, stop_ids=fim.stop_ids(tok),
                           stop_at_newline=single_line, healed=healed, allowed_first=allowed)
