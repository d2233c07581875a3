"""Settings dataclasses shared by the UI, the CLI and the engines.

Each concern has one dataclass (ServeSettings here; ScanSettings and FinetuneSettings beside it). A field is
declared with `setting(...)`, whose metadata (help text, bounds, choices) drives the CLI's `--set key=value`
parsing and help, the validation in `__post_init__`, and the widgets of the UI forms, so none of them repeats
the others.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the field and what is allowed."""


def setting(default: Any = dataclasses.MISSING, *, help: str, min: float | None = None,
            max: float | None = None, choices: tuple | None = None, auto: bool = False,
            default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text and bounds.

    `auto=True` means the value may be None, read as "derive it automatically" (shown as "auto").
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "auto": auto}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _field_type(cls, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    t = hints.get(f.name, str)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if args and typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        t = args[0]
    return typing.get_origin(t) or t


def validate(obj: Any) -> None:
    """Check every field of a settings dataclass against its metadata; raise SettingsError on the first bad one."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        meta = f.metadata
        if "help" not in meta:
            continue
        value = getattr(obj, f.name)
        if value is None:
            if meta.get("auto") or f.default is None:
                continue
            raise SettingsError(f"{f.name}: a value is required ({meta['help']})")
        t = _field_type(cls, f)
        if t is bool and not isinstance(value, bool):
            raise SettingsError(f"{f.name}: expected true or false, got {value!r}")
        if t in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SettingsError(f"{f.name}: expected a number, got {value!r}")
        if t is int and isinstance(value, float) and not value.is_integer():
            raise SettingsError(f"{f.name}: expected a whole number, got {value!r}")
        if t is int and isinstance(value, float):
            object.__setattr__(obj, f.name, int(value))
            value = int(value)
        if t is float and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))
        if t is str and not isinstance(value, str):
            raise SettingsError(f"{f.name}: expected text, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise SettingsError(f"{f.name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta.get("min") is not None and value < meta["min"]:
            raise SettingsError(f"{f.name}: {value} is below the minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise SettingsError(f"{f.name}: {value} is above the maximum {meta['max']}")


def parse_value(cls, name: str, text: str) -> Any:
    """Turn the text of a `--set name=value` into the field's type ("auto" means None for auto fields)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise SettingsError(f"unknown setting {name!r}; known: {', '.join(sorted(fields))}")
    f = fields[name]
    if text.strip().lower() in ("auto", "none", "") and (f.metadata.get("auto") or f.default is None):
        return None
    t = _field_type(cls, f)
    try:
        if t is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            return int(float(text)) if float(text).is_integer() else float(text)
        if t is float:
            return float(text)
        if t in (list, tuple):
            return [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise SettingsError(f"{name}: cannot read {text!r} as {t.__name__}") from None
    return text


def with_overrides(obj, pairs: list[str]):
    """Return a copy of a settings object with `key=value` strings applied and validated."""
    changes = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SettingsError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        changes[key.strip()] = parse_value(type(obj), key.strip(), value)
    return dataclasses.replace(obj, **changes)


def field_specs(cls) -> list[dict]:
    """Field descriptions for building a form or a help table: name, type, default, help, bounds, choices."""
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "type": _field_type(cls, f), "default": default, **f.metadata})
    return out


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict):
    """Build settings from a dict (e.g. a saved settings.json), ignoring keys this version does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in known})


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeSettings:
    """How `refact-lab serve` runs: one jupyter_server with the app, JupyterLab and the inference API."""

    host: str = setting("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)")
    port: int = setting(8008, help="Port for the app, JupyterLab and the API", min=1, max=65535)
    home: str | None = setting(None, help="State directory (default: $REFACT_LAB_HOME or ~/.refact_lab)")
    token: str | None = setting(None, help="API and login token (default: generated and printed at start)")
    no_auth: bool = setting(False, help="Disable the token (only allowed on a loopback address)")
    model: str | None = setting(None, help="Base model to serve: a registry name, a hub id or a local folder")
    max_body_mb: int = setting(16, help="Largest request body accepted by the API, in MiB", min=1, max=1024)

    def __post_init__(self):
        validate(self)
        if self.no_auth and not is_loopback(self.host):
            raise SettingsError(
                f"--no-auth is refused on {self.host}: anyone on the network could use the server. "
                "Use a token, or listen on 127.0.0.1.")
        if self.no_auth and self.token:
            raise SettingsError("--token and --no-auth cannot be used together")
