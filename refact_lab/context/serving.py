"""Which snippets a served FIM prompt gets: the client's own context first, then retrieved ones.

The choice is settings.json's (`context`: a project, "off", or unset for the project of the deployed run;
`context_tokens`: the budget), read through `ServingChoice` like every other serving choice, so the Deploy panel,
the CLI and a running server agree. The query is the code around the cursor; the file being edited is never
returned: excluded by the path the client names, or, when it names none (an OpenAI `suffix` request), by the
lines just above the cursor (a file holding them verbatim is the file being edited, as the scan saw it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from refact_lab.context.index import IndexCache, IndexDamaged, cursor_query
from refact_lab.home import DEFAULT_PROJECT, Home
from refact_lab.models.prompt import Snippet
from refact_lab.serve.state import CONTEXT_OFF, ServingChoice

MAX_SNIPPETS = 4
# The lines just above the cursor identify the file being edited only when they say enough.
MIN_ANCHOR_CHARS = 24


@dataclass(frozen=True)
class PromptContext:
    snippets: tuple[Snippet, ...] = ()
    tokens: int = 0          # the budget the prompt builder enforces
    project: str | None = None


def anchor(prefix: str) -> str | None:
    """The two complete lines above the cursor's line, when they are long enough to identify a file."""
    lines = prefix.splitlines(keepends=True)[:-1] if not prefix.endswith("\n") else prefix.splitlines(keepends=True)
    text = "".join(lines[-2:])
    return text if len(text.strip()) >= MIN_ANCHOR_CHARS else None


class RepoContext:
    """Owned by an engine: resolves the project from the serving choice and keeps its loaded index."""

    def __init__(self, home: Home):
        self.home = home
        self.cache = IndexCache(home)
        self.error: str | None = None   # why the project's index could not be used for the last cursor

    def project(self, choice: ServingChoice, deployed_run: str | None, model=None) -> str | None:
        """The project whose index gives snippets, or None (off). `model`: the served ModelSpec; "auto" is off
        for a model whose scoreboard falls with repository context (`ModelSpec.repo_context`)."""
        if choice.context == CONTEXT_OFF or choice.context_tokens <= 0:
            return None
        if choice.context:
            return choice.context
        if model is not None and not model.repo_context:
            return None
        if deployed_run:
            from refact_lab.keep_current.deploys import run_project

            project = run_project(self.home, deployed_run)
            if isinstance(project, str):
                return project
        return DEFAULT_PROJECT

    def for_cursor(self, choice: ServingChoice, deployed_run: str | None, prefix: str, suffix: str, *,
                   path: str | None = None, client: Sequence[Snippet] = (), retrieve: bool = True,
                   model=None) -> PromptContext:
        """The snippets for a cursor: `client`'s first, then (with `retrieve`) the project's best matches."""
        if choice.context == CONTEXT_OFF or choice.context_tokens <= 0:
            return PromptContext()
        budget = choice.context_tokens
        snippets = list(client)
        project = self.project(choice, deployed_run, model) if retrieve else None
        if project is not None and len(snippets) < MAX_SNIPPETS:
            try:
                index = self.cache.get(project)
                self.error = None
            except IndexDamaged as e:
                # a damaged index must not fail the completion: it goes without retrieved context (as with no
                # index at all) and `error` says why until a scan rebuilds it
                index, self.error = None, str(e)
            if index is not None:
                found = index.retrieve(cursor_query(prefix, suffix), exclude_path=path,
                                       k=MAX_SNIPPETS - len(snippets), token_budget=budget,
                                       exclude_text=None if path else anchor(prefix))
                seen = {(s.path, s.text) for s in snippets}
                snippets += [s for s in found if (s.path, s.text) not in seen]
        return PromptContext(tuple(snippets), budget, project)
