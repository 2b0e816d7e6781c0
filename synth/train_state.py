"""The trainer's bookkeeping: where a run is (`RunState`, what a checkpoint records), when it stops
(`limit_reached`, `planned_steps`), and the signals that ask it to stop at a step boundary (`StopSignals`)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from synth.train_config import TrainConfig


@dataclass
class RunState:
    """Where a run is; a checkpoint records all of it, so a resumed run continues exactly."""

    step: int = 0  # real optimizer steps done
    epoch: int = 0  # complete passes over the loader
    batch_in_epoch: int = 0  # loader batches consumed in the current epoch
    elapsed_s: float = 0.0
    examples: int = 0
    losses: list[float] = field(default_factory=list)  # mean row loss of each real step (NaN: empty batch)
    epoch_rng: torch.Tensor | None = None  # the loader generator's state when the current epoch began


class StopSignals:
    """Turn SIGINT/SIGTERM into a request to stop at the next step boundary (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.received is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.received = signum
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                             "(Ctrl-C again to stop at once)\n")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def stop(self) -> BaseException:
        if self.received == signal.SIGTERM:
            return SystemExit(128 + signal.SIGTERM)
        return KeyboardInterrupt()



def planned_steps(config: TrainConfig, batches_per_epoch: int) -> int | None:
    """The run's planned length in optimizer steps (None: only a time limit)."""
    candidates = []
    if config.max_steps is not None:
        candidates.append(config.max_steps)
    if config.epochs is not None:
        candidates.append(config.epochs * batches_per_epoch)
    return min(candidates) if candidates else None


def limit_reached(config: TrainConfig, state: RunState, *, epoch_end: bool) -> str | None:
    """Which stopping rule (if any) the run has met; epochs are only checked between epochs."""
    if config.max_steps is not None and state.step >= config.max_steps:
        return "max_steps"
    if config.max_minutes is not None and state.elapsed_s >= 60 * config.max_minutes:
        return "max_minutes"
    if epoch_end and config.epochs is not None and state.epoch >= config.epochs:
        return "epochs"
    return None
