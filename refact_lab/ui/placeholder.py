"""An honest placeholder panel: says what will be in a tab until that capability lands."""

from __future__ import annotations

import html

import ipywidgets as w


class PlaceholderPanel:
    def __init__(self, title: str, what: str, items: list[str]):
        bullets = "".join(f"<li>{html.escape(i)}</li>" for i in items)
        self.widget = w.HTML(
            f"<div class='refact-lab-placeholder'><h3>{html.escape(title)}</h3>"
            f"<p>{html.escape(what)}</p><ul>{bullets}</ul>"
            "<p><i>Not built yet: this tab is a placeholder.</i></p></div>")
