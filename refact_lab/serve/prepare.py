"""One path from a completion request to what the engine runs: the route (model and adapter), the prompt's
token ids, the token budget and the sampling parameters. The HTTP handlers (OpenAI completions and chat, Tabby)
and in-process completions (`LocalInference`: the CLI, notebooks) all prepare here.

Size comes first. A prompt with more characters than the model's context could hold even at a generous
CHARS_PER_TOKEN is refused before a tokenizer sees it (a 16 MB prompt once took 22 s to tokenize); a whole file
sent around a cursor (Tabby) is cut to that many characters on each side, then to tokens. Tokenizing is still
CPU work that can take a while near the bound, so handlers run these functions in a worker thread (`off_loop`),
never on the event loop that also answers /v1/health, JupyterLab and Voilà.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from refact_lab.serve.engine import Route, SamplingParams
from refact_lab.serve.protocol import ApiError, Sampling

# Code averages 3-4 characters a token; runs of blanks and long identifiers pack more. 32 is far above what any
# real text reaches, so nothing that fits the context is refused, and bounds tokenizing to ~32 x n_ctx characters.
CHARS_PER_TOKEN = 32
TABBY_SAMPLING = dict(top_p=1.0, stop=(), n=1, stream=False)


@dataclass(frozen=True)
class Prepared:
    route: Route
    ids: list[int]
    params: SamplingParams
    extra_stops: tuple[str, ...] = ()
    snippets: tuple = ()   # the context snippets offered to the prompt builder (client's, then retrieved)


def char_budget(n_ctx: int) -> int:
    """The most characters a prompt for this context may have before it is tokenized."""
    return n_ctx * CHARS_PER_TOKEN


def check_chars(chars: int, n_ctx: int, param: str = "prompt") -> None:
    limit = char_budget(n_ctx)
    if chars > limit:
        raise ApiError(400, f"the prompt is {chars} characters, longer than the model's context of {n_ctx} tokens "
                            f"can hold (at most {limit} characters are read; prompt plus completion must fit)",
                       param, "context_length_exceeded")


def check_budget(prompt_tokens: int, max_tokens: int, n_ctx: int) -> int:
    """Validate prompt length and max_tokens against the context; returns the max_tokens that fits."""
    if prompt_tokens >= n_ctx:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, longer than the model's context of {n_ctx} "
                            "tokens (prompt plus completion must fit)", "prompt", "context_length_exceeded")
    if max_tokens > n_ctx:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; it must be at most {n_ctx} (the model's context)",
                       "max_tokens")
    return min(max_tokens, n_ctx - prompt_tokens)


def _params(ids: list[int], s: Sampling, route: Route, single_line: bool) -> SamplingParams:
    return SamplingParams(check_budget(len(ids), s.max_tokens, route.n_ctx), s.temperature, s.top_p, s.stop,
                          single_line, s.seed)


def prepare_completion(engine, model: str | None, prompt: str, suffix: str | None, sampling: Sampling,
                       single_line: bool = False) -> Prepared:
    """An OpenAI completion. With `suffix` we build the FIM prompt, so the code stays content; a prompt the client
    built (refact-lsp, Continue) carries its own markers, which must be parsed."""
    route = engine.route(model)
    check_chars(len(prompt) + len(suffix or ""), route.n_ctx)
    if suffix is None:
        ids = engine.encode(prompt)
        return Prepared(route, ids, _params(ids, sampling, route, single_line))
    # No file name comes with an OpenAI request: the edited file is recognised by the lines above the cursor.
    ctx = _repo_context(engine, prompt, suffix)
    # the context never takes room the requested completion needs; the code itself is not cut (too long: 400)
    ids = engine.encode_fim(route.fim, prompt, suffix, snippets=ctx.snippets, context_tokens=ctx.tokens,
                            fit_tokens=max(route.n_ctx - sampling.max_tokens, 0))
    return Prepared(route, ids, _params(ids, sampling, route, single_line), snippets=ctx.snippets)


def _repo_context(engine, prefix: str, suffix: str, path: str | None = None, client=(), retrieve: bool = True):
    """Snippets for a FIM prompt as the serving choice says (models/prompt.py lays them out)."""
    dep = getattr(engine, "deployed", None)
    return engine.repo_context.for_cursor(engine.choice, dep.run_id if dep else None, prefix, suffix,
                                          path=path, client=client, retrieve=retrieve,
                                          model=getattr(engine, "spec", None))


# a file name longer than this is cut (to its end, which names the file) before it is tokenized
MAX_PATH_CHARS = 512


def bounded_snippets(snippets, chars: int) -> tuple:
    """The client's snippets as far as `chars` characters of text reach, the last one cut to the rest: the
    prompt builder takes them in order and keeps what fits its token budget, so nothing past a context's worth
    of characters could be used, and tokenizing it (megabytes of declarations) would only hold up the server."""
    from refact_lab.models.prompt import Snippet

    out, left = [], chars
    for s in snippets:
        if left <= 0:
            break
        path = s.path if len(s.path) <= MAX_PATH_CHARS else s.path[-MAX_PATH_CHARS:]
        text = s.text[:left]
        out.append(s if (path, text) == (s.path, s.text) else Snippet(path, text))
        left -= len(text) + len(path)
    return tuple(out)


def prepare_around_cursor(engine, prefix: str, suffix: str, max_tokens: int, temperature: float,
                          single_line: bool, seed: int | None, model: str | None = None, *,
                          repo_context: bool = False, path: str | None = None, snippets=(), stop=(),
                          top_p: float = 1.0) -> Prepared:
    """A cursor in a file (Tabby's request, the scoreboard's cursors): the client sends as much of the file as it
    likes; like Tabby's server, keep what fits around the cursor (characters first, so a huge file is never
    tokenized whole, then tokens). `repo_context`: add the client's `snippets`, then retrieved ones from other
    files than `path`, within the serving choice's budget (the prefix by the cursor keeps its room)."""
    route = engine.route(model)
    max_tokens = min(max_tokens, route.n_ctx // 2)
    keep = char_budget(route.n_ctx)
    prefix, suffix = prefix[-keep:], suffix[:keep]
    path = path[-MAX_PATH_CHARS:] if path else path
    snippets = bounded_snippets(snippets, keep)
    ctx = _repo_context(engine, prefix, suffix, path, snippets) if repo_context else None
    ids = engine.encode_fim(route.fim, prefix, suffix, route.n_ctx - max_tokens, path=path or "",
                            snippets=ctx.snippets if ctx else (), context_tokens=ctx.tokens if ctx else None)
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed,
                        **{**TABBY_SAMPLING, "stop": tuple(stop), "top_p": top_p})
    return Prepared(route, ids, _params(ids, sampling, route, single_line), snippets=ctx.snippets if ctx else ())


def prepare_chat(engine, model: str | None, messages: list[dict], sampling: Sampling) -> Prepared:
    route = engine.route(model)
    check_chars(sum(len(m["content"]) for m in messages), route.n_ctx, "messages")
    ids, extra_stops = engine.encode_chat(messages)
    return Prepared(route, ids, _params(ids, sampling, route, False), extra_stops)


async def off_loop(fn, *args, **kwargs):
    """Run a preparation (tokenizing) in a worker thread, so the event loop keeps answering other requests."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))
