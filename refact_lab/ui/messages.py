"""The one-line message under a panel's buttons: an error in red, news in green.

Panels keep an `ipywidgets.HTML` as `self.message`; `last_error` lets tests and the panel read what the user
was last told went wrong.
"""

from __future__ import annotations

import html


class MessageMixin:
    message: object
    last_error: str | None = None

    def _error(self, text: str) -> None:
        self.last_error = text
        self.message.value = f"<span style='color:#b00'>{html.escape(text)}</span>"

    def _info(self, text: str) -> None:
        self.last_error = None
        self.message.value = f"<span style='color:#060'>{html.escape(text)}</span>"
