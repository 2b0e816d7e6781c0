"""Progress of long stages (training steps, generated images, encoder training, audit phases), throttled.

Two outputs, so that no stage is silent for minutes wherever it runs:
- a tqdm bar on stderr, for a person at a terminal (`bar=True`);
- log lines on the `synthgate.progress` logger (INFO), at most one every `every_s` seconds or each `every_pct`
  percent, plus a start and an end line. The release flow routes this logger to the Prefect run's logs
  (`flows.release`), and `log_to_stderr()` / `lines_on_stderr()` show it where stderr is not a terminal (CI,
  `| tee`, `2> log`, Prefect workers); the CLI chooses between bar and lines (`flows.cli_progress`).
With no handler configured the lines go nowhere (Python's last-resort handler shows only warnings).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

LOGGER = "synthgate.progress"
log = logging.getLogger(LOGGER)

EVERY_S = 15.0  # at most one log line per this many seconds...
EVERY_PCT = 10.0  # ...or per this many percent of the total, whichever comes first


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is emitted (not when the handler was made), so a line lands
    where the process's stderr points now (a redirect, a test's capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it; the property ignores that
        pass


def _stderr_handler() -> logging.Handler | None:
    return next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)


def log_to_stderr() -> None:
    """Show progress lines on stderr (once per process): for a terminal without bars, or a log file."""
    if _stderr_handler() is None:
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)


@contextlib.contextmanager
def handler_attached(handler: logging.Handler) -> Iterator[None]:
    """Progress lines also go to `handler` inside the block (the logger's level and handlers restored after)."""
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def lines_on_stderr() -> Iterator[None]:
    """Progress lines on stderr inside the block (a no-op where `log_to_stderr` already put them there)."""
    if _stderr_handler() is not None:
        yield
        return
    with handler_attached(_StderrHandler()):
        yield


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Throttled progress of one stage of `total` units (None: unknown total). Use as a context manager, or call
    `close()`; `update(n, **postfix)` after each unit of work, `write(message)` for a line that is always shown."""

    def __init__(self, desc: str, *, total: int | None, unit: str, bar: bool, initial: int = 0,
                 every_s: float = EVERY_S, every_pct: float = EVERY_PCT) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n, self._initial = initial, initial
        self.every_s, self.every_pct = every_s, every_pct
        self.postfix: dict[str, Any] = {}
        self._started = self._last_time = time.monotonic()
        self._last_pct = self._pct()
        self._closed = False
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr)
        planned = f"{total} {unit}s" if total is not None else f"{unit}s until a limit is reached"
        resumed = f", resuming at {initial}" if initial else ""
        log.info("%s: started (%s%s)", desc, planned, resumed)

    def _pct(self) -> float:
        return 100.0 * self.n / self.total if self.total else 0.0

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count `n` more units; `postfix` (e.g. loss=0.03) is shown on the bar and in the next log line."""
        self.n += n
        self.postfix.update({k: v for k, v in postfix.items() if v is not None})
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
        now = time.monotonic()
        if now - self._last_time >= self.every_s or (self.total and self._pct() - self._last_pct >= self.every_pct):
            self._last_time, self._last_pct = now, self._pct()
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The current progress as one line: count, percent, rate, time left, postfix."""
        elapsed = (now or time.monotonic()) - self._started
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}s"]
        if self.total:
            parts[0] += f" ({self._pct():.0f}%)"
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}s/s")
            if self.total and self.n < self.total:
                parts.append(f"~{_duration((self.total - self.n) / rate)} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def write(self, message: str) -> None:
        """A line that is always shown (above the bar, or on stderr), and logged."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)
        log.info("%s: %s", self.desc, message)

    def close(self) -> None:
        """End the bar and log the final line (count and elapsed time)."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        log.info("%s: done, %d %ss in %s", self.desc, self.n - self._initial, self.unit,
                 _duration(time.monotonic() - self._started))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def phase(desc: str, message: str) -> None:
    """One log line for a phase of a stage without countable units (e.g. "membership inference: started")."""
    log.info("%s: %s", desc, message)
