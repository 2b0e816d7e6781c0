"""Fit a DP run's planned steps to its time cap before σ is calibrated.

DP-SGD calibrates its noise σ for the planned number of steps: ε is spent in full only if all of them run. A time
cap (`train.max_minutes`) that stops the run earlier leaves part of the budget unspent and the model noisier than
it had to be: on a CPU half as fast per core, the `quality` preset's DP runs stopped at 1176 and 1358 of their 1600
planned steps (benchmarks/README.md). So, before the real run, a probe times a few DP steps of the same network,
batch and privacy code on stand-in data (zeros of the training set's shape: the probe never touches the private
pixels or labels, and the chosen length depends on this machine's speed alone), and the planned steps are lowered
to what fits the time left. σ is then calibrated for steps that will run: the whole ε buys fewer, less noisy steps.

The fitted length depends on the machine, so the same config trains different weights on a slower CPU. The fit is
recorded (model card `step_fit`, privacy ledger, checkpoint): a run resumed from a checkpoint keeps its recorded
length, and pinning `train.max_steps` to the recorded steps (with `train.fit_dp_steps: false`) reproduces the
weights anywhere.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

# Of the time left after the probe, the share the planned steps may fill. The rest absorbs what the probe does not
# see: EMA updates, checkpoints and snapshots, ε refreshes, and the spread of step times (Poisson batch sizes, a
# shared machine). Measured on PneumoniaMNIST's `quality` UNet with DP on 2 cores: runs of 15 steps vary by ±12%
# on a quiet machine, and whole runs averaged 0.98-1.37x (mean 1.16x) the probe's seconds per step
# (benchmarks/README.md, "Steps fitted to the clock").
TIME_MARGIN = 0.85
PROBE_WARMUP_STEPS = 1  # not timed: the first step allocates buffers and installs Opacus' hooks
PROBE_MIN_STEPS = 8  # timed real steps, at least ...
PROBE_MIN_SECONDS = 8.0  # ... and at least this long, so that a few fast or slow steps do not set the plan
PROBE_MAX_STEPS = 40


@dataclass(frozen=True)
class StepFit:
    """One fit of a DP run's length to its time cap, as recorded in the model card and the ledger."""

    requested_steps: int  # planned by the config (max_steps or epochs)
    steps: int  # planned after the fit: what σ is calibrated for
    seconds_per_step: float  # measured by the probe
    probe_steps: int
    probe_seconds: float  # the probe's whole wall time (counted against max_minutes)
    budget_seconds: float  # of max_minutes, what was left for training steps after the probe
    margin: float

    @property
    def lowered(self) -> bool:
        return self.steps < self.requested_steps

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rule": "steps = min(requested_steps, floor(margin * budget_seconds / "
                                         "seconds_per_step)), measured before σ was calibrated"}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StepFit:
        return cls(**{k: record[k] for k in cls.__dataclass_fields__})


def fitted_steps(requested: int, *, seconds_per_step: float, budget_seconds: float,
                 margin: float = TIME_MARGIN) -> int:
    """The planned steps that fit `margin` × `budget_seconds` at `seconds_per_step`, never more than requested
    (0 when not even one step fits)."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step {seconds_per_step!r} must be > 0")
    if budget_seconds <= 0:
        return 0
    return max(0, min(requested, math.floor(margin * budget_seconds / seconds_per_step)))


def time_real_steps(step, is_real, batches, *, settled=None) -> tuple[int, float]:
    """Run `step(images, conditions)` over `batches()` (re-iterated as needed) and time the real optimizer steps
    after `PROBE_WARMUP_STEPS`: until at least `PROBE_MIN_STEPS` of them and `PROBE_MIN_SECONDS` have passed, or
    `PROBE_MAX_STEPS`, or, after `PROBE_MIN_STEPS`, once `settled(seconds_per_step)` says a precise rate would
    not change the plan (a short run fits with room to spare, or no time is left). `is_real()` says whether the
    last call was a real step (physical batches accumulate). Returns (timed steps, their seconds)."""
    warm, timed, started = 0, 0, 0.0
    while True:
        for images, conditions in batches():
            step(images, conditions)
            if not is_real():
                continue
            if warm < PROBE_WARMUP_STEPS:
                warm += 1
                started = time.perf_counter()
                continue
            timed += 1
            seconds = time.perf_counter() - started
            if timed >= PROBE_MAX_STEPS or (timed >= PROBE_MIN_STEPS and seconds >= PROBE_MIN_SECONDS):
                return timed, seconds
            if timed >= PROBE_MIN_STEPS and settled is not None and settled(seconds / timed):
                return timed, seconds
