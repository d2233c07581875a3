"""The one prompt builder: prefix, suffix and context snippets from other files → the token ids a model sees.

Training (packing), serving (the engine's FIM prompts, hence the HTTP handlers, the scoreboard and in-process
completions) and the reference decoder (greedy) all build FIM prompts here, so the layout a model is fine-tuned
on is the layout it is served. The FIM order itself is `FimFormat.layout` (registry.py); this module adds the
context before it:

* the repository layout, when the tokenizer has Qwen2.5-Coder's `<|repo_name|>` and `<|file_sep|>` tokens
  (the embedded default model has them):
  `<|repo_name|>NAME\\n<|file_sep|>path\\ncode\\n<|file_sep|>current_path\\n<|fim_prefix|>...<|fim_middle|>`;
* otherwise commented blocks (`# Path: other.py` then each line commented) at the start of the prefix, as
  Tabby and Continue send them to models that have no file separator.

Code is encoded as content (a file that spells a marker stays text) and markers are inserted by id. With no
snippets the ids are exactly the plain FIM prompt. Under a token budget the snippets give way first: they get at
most `context_tokens` and never more than what is left once the code around the cursor has half the room.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from refact_lab.models.registry import FimFormat, content_ids, token_id

REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"
# A snippet cut shorter than this many tokens says too little to be worth its header.
MIN_SNIPPET_TOKENS = 8
# Line comment by file extension, for the commented layout; anything else gets "#".
_SLASH_COMMENT = {"c", "h", "cc", "cpp", "hpp", "cs", "java", "js", "jsx", "ts", "tsx", "go", "rs", "kt", "swift",
                  "scala", "dart", "php"}


@dataclass(frozen=True)
class Snippet:
    """Code from another file of the project (client-sent or retrieved) shown before the cursor's file."""

    path: str
    text: str


@dataclass(frozen=True)
class PromptIds:
    ids: list[int]
    snippets: tuple[Snippet, ...] = ()   # the snippets that fit (the last one possibly trimmed)


def fim_layout_ids(fim: FimFormat, markers: tuple[int, int, int], pre: list[int], suf: list[int]) -> list[int]:
    """The FIM part of a prompt as ids (markers by id), in the format's order."""
    p, s, m = markers
    return fim.layout([p], pre, [s], suf, [m])


def repo_tokens(tok) -> tuple[int, int] | None:
    """(repo_name, file_sep) ids when this tokenizer has both as single tokens: the repository layout."""
    ids = token_id(tok, REPO_NAME), token_id(tok, FILE_SEP)
    return None if None in ids else ids


def _comment(path: str) -> str:
    return "//" if path.rsplit(".", 1)[-1].lower() in _SLASH_COMMENT else "#"


def commented_block(snippet: Snippet, current_path: str = "") -> str:
    """A snippet as comment lines in the language of the file being completed."""
    c = _comment(current_path or snippet.path)
    lines = snippet.text.splitlines() or [""]
    return f"{c} Path: {snippet.path}\n" + "".join(f"{c} {line}\n" if line else f"{c}\n" for line in lines)


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def context_ids(tok, snippets: Sequence[Snippet], budget: int | None, *, path: str = "", repo: str = "",
                ) -> tuple[list[int], list[int], tuple[Snippet, ...]]:
    """(ids before the FIM prefix marker, ids at the start of the prefix, snippets used) within `budget` tokens.

    Snippets are taken in order (the client's first, then retrieved ones); the first that does not fit is cut
    to the room left (keeping its start), and the rest are dropped."""
    if not snippets or (budget is not None and budget <= 0):
        return [], [], ()
    repo_ids = repo_tokens(tok)
    if repo_ids is not None:
        name, sep = repo_ids
        head = [name] + content_ids(tok, (repo or "project") + "\n")
        tail = [sep] + content_ids(tok, (path or "current_file") + "\n")
        blocks = [([sep] + content_ids(tok, s.path + "\n"), content_ids(tok, _with_newline(s.text)), s)
                  for s in snippets]
    else:
        head, tail = [], []
        blocks = [([], content_ids(tok, commented_block(s, path)), s) for s in snippets]
    fixed = len(head) + len(tail)
    room = None if budget is None else budget - fixed
    body: list[int] = []
    used: list[Snippet] = []
    for header, code, snippet in blocks:
        left = None if room is None else room - len(body) - len(header)
        if left is not None and left < min(len(code), MIN_SNIPPET_TOKENS):
            break
        if left is not None and left < len(code):
            body += header + code[:left]
            used.append(snippet)
            break
        body += header + code
        used.append(snippet)
    if not used:
        return [], [], ()
    if repo_ids is not None:
        return head + body + tail, [], tuple(used)
    return [], body, tuple(used)


def cut_around_cursor(pre: list[int], suf: list[int], room: int, prefix_share: float = 0.75,
                      ) -> tuple[list[int], list[int]]:
    """Keep the end of the prefix and the start of the suffix within `room` tokens. The prefix gets
    `prefix_share` of the room (the text before the cursor predicts most of what follows); whatever one side
    does not use is given to the other."""
    room = max(room, 0)
    n_pre = min(len(pre), max(int(room * prefix_share), room - len(suf)))
    n_suf = min(len(suf), room - n_pre)
    return (pre[len(pre) - n_pre:] if n_pre else []), suf[:n_suf]


def build_fim_ids(tok, fim: FimFormat, prefix: str, suffix: str, snippets: Sequence[Snippet] = (), *,
                  max_prompt_tokens: int | None = None, context_tokens: int | None = None, path: str = "",
                  repo: str = "", prefix_share: float = 0.75, fit_tokens: int | None = None) -> PromptIds:
    """The FIM prompt's ids with context snippets before the cursor's file.

    `max_prompt_tokens` None: the code is never cut, and the snippets take at most `context_tokens` and what is
    left of `fit_tokens` after the code. Otherwise the code around the cursor is cut as it always was, and the
    snippets take at most `context_tokens` of the room and never more than what is left after the code, or
    after half the room when the code needs more: the prefix next to the cursor is never pushed out by context.
    """
    markers = fim.marker_ids(tok)
    if markers is None:
        raise ValueError(f"this tokenizer does not have the FIM markers {fim.prefix!r}, {fim.suffix!r}, "
                         f"{fim.middle!r} as single tokens")
    if max_prompt_tokens is None:
        pre, suf = content_ids(tok, prefix), content_ids(tok, suffix)
        ctx_room = context_tokens
        if fit_tokens is not None:
            left = fit_tokens - len(markers) - len(pre) - len(suf)
            ctx_room = left if ctx_room is None else min(ctx_room, left)
        before, in_prefix, used = context_ids(tok, snippets, ctx_room, path=path, repo=repo)
        return PromptIds(before + fim_layout_ids(fim, markers, in_prefix + pre, suf), used)
    room = max_prompt_tokens - len(markers)
    # A token is rarely longer than 8 characters, so this much text always covers the room.
    pre, suf = cut_around_cursor(content_ids(tok, prefix[-room * 8:]), content_ids(tok, suffix[:room * 8]),
                                 room, prefix_share)
    ctx_room = max(room - len(pre) - len(suf), room // 2)
    if context_tokens is not None:
        ctx_room = min(ctx_room, context_tokens)
    before, in_prefix, used = context_ids(tok, snippets, ctx_room, path=path, repo=repo)
    n_ctx = len(before) + len(in_prefix)
    if n_ctx:
        pre, suf = cut_around_cursor(pre, suf, room - n_ctx, prefix_share)
    return PromptIds(before + fim_layout_ids(fim, markers, in_prefix + pre, suf), used)


def build_fim_text(fim: FimFormat, prefix: str, suffix: str, snippets: Sequence[Snippet] = (), path: str = "") -> str:
    """The prompt as text, for a format whose markers are not single tokens of the tokenizer (it is parsed)."""
    context = "".join(commented_block(s, path) for s in snippets)
    return fim.prompt(context + prefix, suffix)
