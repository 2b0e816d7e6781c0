"""Number formatting for the audit report (`reports.report`): the jinja filters and environment."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

from reports.report_layout import TEMPLATES

# --------------------------------------------------------------------------------------------------------------
# Formatting (jinja filters)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, spec: str = ".3g") -> str:
    """A number for people: `spec` for floats, thousands separators for ints, '–' when missing."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return format(v, spec)
    return str(v)


def fmt_pct(v: Any) -> str:
    return "–" if not _finite(v) else f"{100 * float(v):.3g}%"


def fmt_ci(ci: Any, spec: str = ".3f") -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or not all(_finite(x) for x in ci):
        return "–"
    return f"[{format(float(ci[0]), spec)}, {format(float(ci[1]), spec)}]"


def metric_parts(m: Any) -> tuple[float | None, list[float] | None]:
    """(value, ci) from `{"value": v, "ci": [lo, hi]}` or a bare number."""
    if isinstance(m, Mapping):
        v, ci = m.get("value"), m.get("ci")
        return (float(v) if _finite(v) else None), (list(ci) if isinstance(ci, list | tuple) else None)
    return (float(m) if _finite(m) else None), None


def fmt_metric(m: Any, spec: str = ".3f") -> str:
    """'0.912 [0.880, 0.940]' from a `{"value", "ci"}` metric."""
    v, ci = metric_parts(m)
    if v is None:
        return "–"
    text = format(v, spec)
    return f"{text} {fmt_ci(ci, spec)}" if ci and all(_finite(x) for x in ci) else text


def _clip(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def short_hash(h: Any) -> str:
    return (str(h)[:12] + "…") if h else "–"


@functools.cache
def html_env():  # -> jinja2.Environment
    """The report's jinja2 environment: HTML autoescaping always on, undefined names are errors."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt, pct=fmt_pct, ci=fmt_ci, metric=fmt_metric, short=short_hash)
    return env
