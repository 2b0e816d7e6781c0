"""The shared shape of a typed artifact header, and the one way a header is checked against its schema.

Each artifact's schema (a pydantic model) lives beside its writer; this module holds what they share: the keys
every header has (`synth.artifacts.write_header`) and `parse_header`/`load_header`, which turn a schema failure into
one `InputError` line naming the file and the first bad key. Schemas allow extra keys, so an older reader accepts
the header of a newer writer that records more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.artifacts import read_header
from synth.errors import InputError, where


class HeaderModel(BaseModel):
    """The keys `synth.artifacts.write_header` writes into every artifact header."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: str
    schema_version: int
    content_hash: str = Field(min_length=1)
    inputs: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    files: list[str] = Field(default_factory=list)
    created: str

    def extra(self, key: str) -> Any:
        """A body key outside the schema, or None."""
        return (self.model_extra or {}).get(key)


M = TypeVar("M", bound=BaseModel)


def parse_header(schema: type[M], header: dict[str, Any], *, source: object, what: str) -> M:
    """Validate a header already read against `schema`; a failure is one InputError line
    `<source>: malformed <what>: <key path>: <problem>`."""
    try:
        return schema.model_validate(header)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "header"
        raise InputError(where(source, f"malformed {what}: {loc}: {err['msg']}")) from None


def load_header(schema: type[M], root: Path, name: str, *, kind: str, what: str) -> tuple[dict[str, Any], M]:
    """Read `root/name` (kind-checked, `synth.artifacts.read_header`) and validate it against `schema`: the header
    as written (a plain dict, for code that passes it on as JSON) and its typed form."""
    header = read_header(Path(root), name, kind=kind)
    return header, parse_header(schema, header, source=Path(root) / name, what=what)
