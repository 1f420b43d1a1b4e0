"""Typed settings sections: the one config dialect of run configs, sweeps, demo profiles and attacks.

A section is a dataclass whose fields are declared with `opt(default, help, **bounds)`.
`build_section` turns a mapping into one, coercing values by the field's type and checking
bounds, so every kind of file and every override reports a bad value with the same message
(`train.lr='x': expected float`, `authors.retain=0: must be >= 1`, `unknown config key ...`).

Files and overrides go through the same three helpers: `load_yaml` (one YAML loader, one set of
messages), `parse_overrides` (`a.b.c=value` strings into nested mappings, `set_dotted` being the one
dotted setter) and `deep_merge` (layers of settings, later ones winning key by key).

A leaf module: it imports nothing of pmc_unlearn but `errors`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from pmc_unlearn.errors import UserError


def opt(default, help: str, **kw):
    """A dataclass field with a help text and optional checks: min, max, gt, choices, not_zero, auto
    (the string 'auto' is accepted besides the type), required (the key must be given)."""
    meta = {"help": help, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def base_type(tp) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], type(None) in typing.get_args(tp)
    return tp, False


def coerce(section: str, f: dataclasses.Field, value: Any, hints: dict[str, Any]) -> Any:
    """`value` for field `f` of `section`, converted to the field's type (strings are read as YAML) and
    checked against its bounds; UserError naming `section.key` otherwise."""
    key = f"{section}.{f.name}"
    tp, nullable = base_type(hints[f.name])
    if f.metadata.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"  # a tri-state setting: resolved per device at run time (pmc_unlearn.precision)
    if value is None:
        if nullable:
            return None
        raise UserError(f"{key}: null is not allowed; give a {tp.__name__}")
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"{key}={value!r}: not a valid value") from e
        if value is None and nullable:
            return None
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{key}={value!r}: must be a finite number")
        elif tp is str:
            value = str(value)
        elif tp in (list, dict) or typing.get_origin(tp) in (list, dict):
            base = typing.get_origin(tp) or tp
            if not isinstance(value, base):
                raise TypeError
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r}: expected {getattr(tp, '__name__', tp)}") from None
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{key}={value!r}: choose one of {', '.join(map(str, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise UserError(f"{key}={value!r}: must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise UserError(f"{key}={value!r}: must be <= {meta['max']}")
    if "gt" in meta and not value > meta["gt"]:
        raise UserError(f"{key}={value!r}: must be > {meta['gt']}")
    if meta.get("not_zero") and value == 0:
        raise UserError(f"{key}=0: a run needs at least one step; give a positive number, or -1 for no limit")
    return value


def build_section(cls: type, section: str, values: Any, base=None):
    """A section dataclass from a mapping (over `base`, or the defaults), rejecting unknown keys, missing
    required keys and bad values; then the dataclass's own `validate()`, when it has one."""
    if not isinstance(values, dict):
        raise UserError(f"config section '{section}' must be a mapping of key: value")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(
            f"unknown config key {section}.{unknown[0]}; known keys in '{section}': {', '.join(sorted(fields))}"
        )
    if base is None:
        missing = [n for n, f in fields.items() if f.metadata.get("required") and n not in values]
        if missing:
            raise UserError(f"{section}.{missing[0]} is missing: {fields[missing[0]].metadata['help']}")
    obj = base if base is not None else cls()
    for k, v in values.items():
        setattr(obj, k, coerce(section, fields[k], v, hints))
    check = getattr(obj, "validate", None)
    if check:
        check()
    return obj


def config_help(cls: type, section: str) -> str:
    """Every key of a section with its default and help, as `section:` then `  key = default  # help` lines."""
    lines = [f"{section}:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ----- files, overrides, layers ----------------------------------------------------------------------

def load_yaml(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """A YAML file holding a mapping ({} when empty); UserError naming `flag` when it is missing or not one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag} {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{flag} {path}: not valid YAML ({e})") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{flag} {path}: expected a mapping of sections")
    return raw


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for dotted = 'a.b.c', creating the mappings on the way."""
    keys = [k.strip() for k in dotted.split(".")]
    cur = tree
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"override {dotted}: '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_override(item: str, example: str = "train.lr=1e-5", parse_value: bool = False,
                   sectioned: bool = True) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value). The value stays a string (`parse_value=False`: typed sections convert
    it by the key's type) or is read as YAML (for untyped places, e.g. a demo profile's `unlearn.npo=null`).
    `sectioned`: the key must name a section and a key in it (a.b), not a top-level key alone."""
    key, sep, raw = item.partition("=")
    parts = key.split(".")
    if not sep or not all(k.strip() for k in parts) or (sectioned and len(parts) < 2):
        raise UserError(f"override '{item}': write it as section.key=value (e.g. {example})")
    if not parse_value:
        return key.strip(), raw
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"override '{item}': not a valid value") from e


def parse_overrides(items: Iterable[str], example: str = "train.lr=1e-5") -> dict[str, Any]:
    """`section.key=value` strings -> nested {section: {key: value}}, values left as strings."""
    out: dict[str, Any] = {}
    for item in items:
        set_dotted(out, *parse_override(item, example))
    return out


def deep_merge(a: dict, b: dict | None) -> dict:
    """b over a: nested mappings merged key by key, other values replaced (copies; neither is changed)."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
