"""Where a long command's progress goes (`synthgate train`, `generate`, `audit privacy|utility`).

- stderr is a terminal: tqdm bars (training steps, generated images); commands that show a rich spinner instead
  (the audits) put the latest progress line in the spinner's text;
- stderr is not a terminal (CI, `2> log`, `| tee`, a scheduler): no bars, but the throttled `synth.progress` lines
  (start, every 10 % or 15 s, end) on stderr, so a long command is never silent;
- `--no-progress`: neither.
`synthgate release` always logs the lines (the flow routes them to stderr and the Prefect run, `flows.release`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from synth.progress import handler_attached, lines_on_stderr


def stderr_is_terminal() -> bool:
    """Whether stderr (where bars and progress lines go) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class _StatusText(logging.Handler):
    """Shows each progress line as the text of a rich status spinner."""

    def __init__(self, status: Any) -> None:
        super().__init__()
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.status.update(record.getMessage())
        except Exception:  # a display problem must not stop the work
            self.handleError(record)


@contextlib.contextmanager
def cli_progress(enabled: bool = True, *, status: Any = None) -> Iterator[bool]:
    """Route progress for one command; yields whether to draw tqdm bars. `status`: the command's rich spinner
    (`console.status(...)`), whose text then follows the progress lines on a terminal."""
    if not enabled:
        yield False
    elif stderr_is_terminal():
        if status is None:
            yield True
        else:
            with handler_attached(_StatusText(status)):
                yield True
    else:
        with lines_on_stderr():
            yield False
