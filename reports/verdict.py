"""The gate's verdict (`verdict.json`): its schema and its one reader.

`flows.policy.gate` builds a `Verdict` and `flows.stages.gate_stage` writes it into the release's work dir; the
report (`reports.report_inputs`) and `synthgate report --verdict FILE` read it back through `parse_verdict` /
`read_verdict`. The schema lives here, below `flows`, because `reports` reads it and may not import `flows`.
Extra keys are ignored (a newer gate may record more); a malformed verdict is one `InputError` line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.errors import InputError, where


class Check(BaseModel):
    """One rule of the gate: what was measured, against what, and whether it passed."""

    model_config = ConfigDict(frozen=True)

    rule: str = Field(strict=True)
    passed: bool = Field(strict=True)
    value: float | int | bool | str | None = None
    threshold: float | int | bool | str | None = None
    message: str = ""


class Verdict(BaseModel):
    """pass/block with every check (`reasons` are the failed ones)."""

    model_config = ConfigDict(frozen=True)

    decision: Literal["pass", "block"]
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return self.decision == "pass"

    @property
    def reasons(self) -> list[str]:
        return [c.message for c in self.checks if not c.passed]


def _problem(data: Mapping[str, Any], err: Mapping[str, Any]) -> str:
    """The first schema failure in words a steward editing the file by hand can act on."""
    loc = tuple(err["loc"])
    if loc[:1] == ("decision",):
        return f"verdict decision must be 'pass' or 'block', got {data.get('decision')!r}"
    if loc == ("checks",):
        return "verdict has no list of checks"
    if len(loc) >= 2 and loc[0] == "checks" and isinstance(loc[1], int):
        return f"verdict check {loc[1]} needs a 'rule' (text) and 'passed' (true/false)" \
            if len(loc) == 2 or loc[2] in ("rule", "passed") else \
            f"verdict check {loc[1]}: {'.'.join(map(str, loc[2:]))}: {err['msg']}"
    return f"malformed verdict: {'.'.join(map(str, loc)) or 'verdict'}: {err['msg']}"


def parse_verdict(data: Any, *, source: object = "verdict") -> Verdict:
    """A verdict from its JSON form: the verdict at the top level, or under a `verdict` key (one-line InputError
    naming `source` when malformed)."""
    if isinstance(data, Mapping) and "decision" not in data and isinstance(data.get("verdict"), Mapping):
        data = data["verdict"]
    if not isinstance(data, Mapping):
        raise InputError(where(source, f"a verdict must be a JSON object, got {type(data).__name__}"))
    try:
        return Verdict.model_validate(dict(data))
    except ValidationError as e:
        raise InputError(where(source, _problem(data, e.errors()[0]))) from None


def read_verdict(path: Path) -> Verdict:
    """The verdict in the JSON file at `path` (one-line InputError naming it when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(where(path, "verdict file not found"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(where(path, f"cannot be read as JSON ({e.__class__.__name__})")) from None
    return parse_verdict(data, source=path)
