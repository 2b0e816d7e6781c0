"""Typed configs from users: YAML files and dicts validated by pydantic, errors turned into one line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from synth.errors import ConfigError, InputError, where

T = TypeVar("T", bound=BaseModel)


def describe(error: ValidationError) -> str:
    """All of a pydantic error's problems on one line: 'field: message (got value); ...'."""
    parts = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def build(cls: type[T], data: Mapping[str, Any], *, source: str | Path = "config") -> T:
    """Validate `data` as `cls`, raising ConfigError naming `source` and the bad fields."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(where(source, describe(e))) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping from `path` with one-line errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(where(path, "no such file"))
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise InputError(where(path, f"is not valid YAML ({first})")) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise InputError(where(path, "is not valid YAML (nested too deeply)")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(where(path, f"must hold a mapping of settings, not a {type(data).__name__}"))
    return data
