"""What the trainer shows: rank 0's progress bar and the messages that say where the work went."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from synth.train_state import RunState


def _progress_bar(enabled: bool, *, show_bar: bool, total: int | None, initial: int, private: bool) -> Any:
    # Throttled log lines always (the release flow shows them in Prefect's logs); the tqdm bar when asked.
    if not enabled:
        return None
    from synth.progress import Progress

    return Progress("train (DP)" if private else "train", total=total, unit="step", bar=show_bar, initial=initial)


def _update_bar(bar: Any, state: RunState, eps: float | None) -> None:
    if bar is None:
        return
    recent = [x for x in state.losses[-20:] if not math.isnan(x)]
    bar.update(1, loss=f"{np.mean(recent):.4f}" if recent else "-", epoch=state.epoch,
               **({"ε": f"{eps:.2f}"} if eps is not None else {}))


def _say(bar: Any, message: str) -> None:
    # Always shown (even without a progress bar): it says where the work went and how to continue it.
    if bar is not None:
        bar.write(message)
    else:
        print(message, file=sys.stderr)
