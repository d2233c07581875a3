"""Retrieved context for fine-tuning examples, so the model learns to copy from other files of its project.

Packing (finetune/packing.py) picks which files' examples carry context (the `context_rate` setting); this module
finds their snippets: an in-memory BM25 index over the TRAIN files only (a test file can never leak into
training), queried with the code around each example's cursor as the server queries it (`cursor_query`), never
returning the example's own file. The snippets are then laid out by the one prompt builder, as served.
"""

from __future__ import annotations

from typing import Sequence

from refact_lab.context.index import ProjectIndex, cursor_query
from refact_lab.models.prompt import Snippet

MAX_SNIPPETS = 4


def example_snippets(train_files: Sequence[tuple[str, str]], items: Sequence[tuple[str, object]],
                     token_budget: int) -> list[tuple[Snippet, ...]]:
    """Snippets for each (file key, Example) of `items`: () where the key is "" (no context drawn) or the
    example is plain text; otherwise the best chunks of the other train files within `token_budget`."""
    if not any(key for key, _ in items):
        return [()] * len(items)
    index = ProjectIndex.in_memory(train_files)
    out: list[tuple[Snippet, ...]] = []
    for key, ex in items:
        if not key or ex.kind == "plain":
            out.append(())
            continue
        out.append(tuple(index.retrieve(cursor_query(ex.prefix, ex.suffix), exclude_path=key, k=MAX_SNIPPETS,
                                        token_budget=token_budget)))
    return out
