"""One settings field as a widget, built from the dataclass field metadata (`refact_lab.config.field_specs`).

The Scan and Fine-tune forms are lists of these, labelled with the field's human label (`spec["label"]`, from
`refact_lab.config.field_label`: one place for both forms and the CLI). The type picks the widget (a dropdown
for choices, a checkbox, bounded int/float boxes, text; lists as comma-separated text), `auto` fields get an
"auto" checkbox that means None, and the bounds are shown beside the box. `show_auto` puts the value "auto"
stood for (e.g. the loss threshold the last scan applied) in the disabled box, so auto never reads as 0.
Validation stays in the dataclass: the panel builds the settings object from `get()` and shows its
SettingsError.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w

_BIG = 1e12


class SettingField:
    def __init__(self, spec: dict, *, css_class: str, width: str = "300px", label_width: str = "140px"):
        self.spec = spec
        kind, default, tip = spec["type"], spec["default"], spec["help"]
        name = spec.get("label") or spec["name"]
        lo = spec["min"] if spec.get("min") is not None else -_BIG
        hi = spec["max"] if spec.get("max") is not None else _BIG
        layout, style = w.Layout(width=width), {"description_width": label_width}
        if spec.get("choices"):
            self.input = w.Dropdown(options=list(spec["choices"]), value=default, description=name, tooltip=tip,
                                    layout=layout, style=style)
        elif kind is bool:
            self.input = w.Checkbox(value=bool(default), description=name, tooltip=tip, indent=False, layout=layout)
        elif kind is int:
            start = default if default is not None else int(max(lo, 1))
            self.input = w.BoundedIntText(value=start, min=int(lo), max=int(hi), description=name, tooltip=tip,
                                          layout=layout, style=style)
        elif kind is float:
            start = default if default is not None else float(max(lo, 0))
            self.input = w.BoundedFloatText(value=start, min=lo, max=hi, step=None, description=name, tooltip=tip,
                                            layout=layout, style=style)
        else:
            text = ", ".join(default) if isinstance(default, list) else ("" if default is None else str(default))
            self.input = w.Text(value=text, description=name, tooltip=tip, layout=layout, style=style,
                                placeholder="comma-separated" if kind is list else "(default)")
        self.auto = None
        if spec.get("auto"):
            self.auto = w.Checkbox(value=default is None, description="auto", indent=False, tooltip=tip,
                                   layout=w.Layout(width="70px"))
            self.input.disabled = self.auto.value
            self.auto.observe(lambda ch: setattr(self.input, "disabled", ch["new"]), "value")
        self._auto_value = None
        bounds = ""
        if spec.get("min") is not None and spec.get("max") is not None and not spec.get("choices") \
                and kind is not bool:
            fmt = (lambda v: f"{int(v):,}") if kind is int else (lambda v: f"{v:g}")
            bounds = f"{fmt(spec['min'])} – {fmt(spec['max'])}"
        self._bounds = bounds
        self.hint = w.HTML()
        self._render_hint()
        self.widget = w.HBox([self.input, *([self.auto] if self.auto else []), self.hint])
        self.widget.add_class(css_class)  # a stable handle for browser tests

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def label(self) -> str:
        return self.input.description

    def show_auto(self, value: Any, note: str = "") -> None:
        """Show what "auto" means now (`value`, with a note such as "applied by the last scan") while auto is
        ticked; `get()` still returns None, so the value is derived again next time."""
        self._auto_value = (value, note)
        if self.auto is not None and self.auto.value and value is not None:
            self.input.value = value
        self._render_hint()

    def _render_hint(self) -> None:
        text = self._bounds
        if self.auto is not None and self._auto_value and self._auto_value[0] is not None:
            value, note = self._auto_value
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            text = f"auto: {shown}" + (f" ({note})" if note else "") + (f"; {text}" if text else "")
        tip = html.escape(self.spec["help"], quote=True)
        text = html.escape(text, quote=False)
        self.hint.value = f"<span style='color:#777;font-size:90%' title='{tip}'>{text}</span>"

    def get(self) -> Any:
        if self.auto is not None and self.auto.value:
            return None
        value = self.input.value
        if self.spec["type"] is list:
            return [p.strip() for p in value.split(",") if p.strip()]
        if self.spec["type"] is str and value == "" and self.spec["default"] is None:
            return None
        return value

    def set(self, value: Any) -> None:
        if self.auto is not None:
            self.auto.value = value is None
            if value is None:
                return
        if self.spec["type"] is list:
            value = ", ".join(value or [])
        elif value is None and isinstance(self.input, w.Text):
            value = ""
        self.input.value = value

    def observe(self, callback) -> None:
        self.input.observe(callback, "value")
        if self.auto is not None:
            self.auto.observe(callback, "value")
