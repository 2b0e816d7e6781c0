"""What the trainer shows: rank 0's progress bar and the messages that say where the work went."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from synth.train_state import RunState


def _progress_bar(enabled: bool, *, total: int | None, initial: int, private: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train (DP)" if private else "train",
                dynamic_ncols=True, file=sys.stderr)


def _update_bar(bar: Any, state: RunState, eps: float | None) -> None:
    if bar is None:
        return
    recent = [x for x in state.losses[-20:] if not math.isnan(x)]
    post = {"loss": f"{np.mean(recent):.4f}" if recent else "-", "epoch": state.epoch}
    if eps is not None:
        post["ε"] = f"{eps:.2f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def _say(bar: Any, message: str) -> None:
    # Always shown (even without a progress bar): it says where the work went and how to continue it.
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)
