"""Run configurations: dataclasses filled from YAML files and `key=value` overrides, validated field by field."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def _accepts(annotation, value) -> bool:
    """Whether `value` fits a field annotation (the simple types run configs use)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is typing.Any:
        return True
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _describe(annotation) -> str:
    """A field's type in words: `int | None` -> "an integer or null"."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (typing.Any,)
        return f"a list of ({_describe(item)})"
    if origin is dict:
        return "a mapping"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def build_config(cls: type, values: dict[str, Any], source: str = "config"):
    """`cls(**values)` after checking every key is a field and every value fits its type; errors name the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(fields)}")
    for key, value in values.items():
        if not _accepts(hints[key], value):
            raise ValueError(f"{source}: {key} must be {_describe(hints[key])}, got {value!r}")
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["steps=100", "schemes=[rope, alibi]"]` -> {"steps": 100, "schemes": ["rope", "alibi"]} (values are YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """A `cls` from an optional YAML file, then `overrides` on top."""
    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--config: no such file {path}")
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a run config is a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return build_config(cls, values, source=str(path) if path else "config")
