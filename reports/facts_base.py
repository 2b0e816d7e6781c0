"""What every release fact model shares (`reports.facts`): frozen pydantic models that refuse unknown keys, and
the guard that keeps free-form `details`/`config` dicts small plain JSON (never pixels or binary)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Guards against pixel arrays sneaking into facts through free-form dicts: no list this long is a summary.
MAX_LIST_ITEMS = 1024
MAX_DEPTH = 8


def check_plain(value: Any, path: str = "details", depth: int = 0) -> None:
    """Raise ValueError unless `value` is small plain JSON (no bytes, arrays, tensors or huge lists)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: key {k!r} is not a string")
            check_plain(v, f"{path}.{k}", depth + 1)
        return
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"{path}: list of {len(value)} items (> {MAX_LIST_ITEMS}); facts hold summaries only")
        for i, v in enumerate(value):
            check_plain(v, f"{path}[{i}]", depth + 1)
        return
    raise ValueError(f"{path}: {type(value).__name__} is not plain JSON (facts never hold pixel data or binary)")


class FactsModel(BaseModel):
    """Base of every fact model: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def plain_dict(v: Any, info: Any) -> Any:
    """A field validator: the value must be small plain JSON (`check_plain`)."""
    check_plain(v, info.field_name)
    return v


class ImageSpec(FactsModel):
    """Image size of a set the documents describe."""

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: int = Field(ge=1)
