"""Typed dataclass settings from plain data: nested mappings (YAML) and dotted ``key=value``
overrides cast to each field's annotated type, with errors that name the key, the bad value
and the fix. Generic: :mod:`fmri2text.config` holds the fields and the range checks."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Union

import yaml

from fmri2text.errors import UserError


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass ``cls``, nested dataclasses flattened."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(dotted_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Cast ``value`` to the annotated type ``tp`` or raise a UserError naming both."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}", path=source,
                            fix=f"write {key}=[a,b] or a YAML list")
        return [coerce(v, item_tp, key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config key '{key}' must be true or false, got {value!r}", path=source,
                        fix=f"write {key}=true or {key}=false")
    if tp in (int, float):
        if isinstance(value, bool):
            ok = False
        elif tp is int:
            ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        else:
            ok = isinstance(value, (int, float))
        if not ok and isinstance(value, str):
            # YAML 1.1 reads '1e-3' as a string: accept any Python number literal
            try:
                number = float(value) if tp is float else int(value)
            except ValueError:
                _bad(value, tp, key, source)
            if tp is float and not math.isfinite(number):
                raise UserError(f"config key '{key}' must be a finite number, got {value!r}",
                                path=source, fix=f"set {key} to a finite number")
            return number
        if not ok:
            _bad(value, tp, key, source)
        if tp is float and not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}",
                            path=source, fix=f"set {key} to a finite number")
        return tp(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            _bad(value, tp, key, source)
        return str(value)
    return value


def _bad(value: Any, tp: Any, key: str, source: str):
    raise UserError(f"config key '{key}' must be {tp.__name__}, got {value!r}", path=source,
                    fix=f"set {key} to a {tp.__name__} value")


def apply(obj: Any, data: dict, prefix: str, source: str, keys: Callable[[], list[str]]) -> None:
    """Set the fields of dataclass ``obj`` from the mapping ``data`` (nested sections into
    nested dataclasses), each value cast by :func:`coerce`; an unknown key is a UserError
    listing ``keys()``. ``source`` (a file or 'command line') is named in errors."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, "
                        f"got {data!r}", path=source, fix="write it as 'key: value' lines")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise UserError(
                f"unknown config key '{key}'", path=source,
                fix="valid keys are: " + ", ".join(keys()))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            apply(getattr(obj, k), v if v is not None else {}, f"{key}.", source, keys)
        else:
            setattr(obj, k, coerce(v, tp, key, source))


def parse_override(text: str, root: type, keys: Callable[[], list[str]]) -> tuple[str, Any]:
    """``key=value`` as (key, value): YAML-read, except that a text (or list of texts) field
    of dataclass ``root`` takes the value verbatim."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key=value",
                        fix="write e.g. data.window=3 (valid keys: " + ", ".join(keys()) + ")")
    key, raw = text.split("=", 1)
    key = key.strip()
    # strings (and lists of strings) are read verbatim, so subject labels keep leading zeros
    if _is_text_key(root, key):
        raw = raw.strip()
        if raw.startswith("[") and raw.endswith("]"):
            return key, [v.strip().strip("'\"") for v in raw[1:-1].split(",") if v.strip()]
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _is_text_key(root: type, key: str) -> bool:
    cls: Any = root
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return cls is str or cls == list[str]


def nest(key: str, value: Any) -> dict:
    """``a.b.c``, v -> {"a": {"b": {"c": v}}}."""
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out
