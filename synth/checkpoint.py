"""Training checkpoints: one atomically replaced file holding everything a bit-exact resume needs.

    <out>.ckpt/checkpoint.pt     torch.save of: model, EMA, optimizer, RNG states (torch, CUDA, numpy, python,
                                 the data loader's generator at the start of the current epoch, the noise
                                 generator), step/epoch/position in the epoch, elapsed time, loss history,
                                 the privacy strategy's state, and the config + dataset hash it belongs to
    <out>.ckpt/checkpoint.json   a human-readable summary (step, epoch, time)

It is loaded with `weights_only=True`, so it may hold only tensors and plain Python values (a privacy strategy's
`state_dict` must keep to those too).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synth.artifacts import atomic_file, write_json
from synth.errors import InputError, where

CHECKPOINT = "checkpoint.pt"
SUMMARY = "checkpoint.json"
FORMAT = 1


def default_checkpoint_dir(out: Path) -> Path:
    """`<out>.ckpt` beside the model directory."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def capture_rng(loader_epoch_state: torch.Tensor, noise_generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step reads, in weights-only-loadable types."""
    np_state = np.random.get_state(legacy=False)
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(k) for k in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [version, list(py_state), gauss],
        "loader_epoch": loader_epoch_state.clone(),
        "noise": noise_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], noise_generator: torch.Generator) -> torch.Tensor:
    """Restore the global and noise RNGs; return the loader generator's state at the start of the epoch."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    noise_generator.set_state(state["noise"])
    return state["loader_epoch"]


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically replace `ckpt_dir/checkpoint.pt` (and its summary) with `state`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(exist_ok=True)
    path = ckpt_dir / CHECKPOINT
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    with atomic_file(ckpt_dir / SUMMARY) as tmp:
        write_json(
            tmp,
            # step_fit: read before the run is rebuilt (synth.training._recorded_fit), without loading the weights.
            {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "elapsed_s", "dataset", "step_fit")
             if k in state},
        )
    return path


def has_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / CHECKPOINT).is_file()


def load_checkpoint(ckpt_dir: Path, *, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load `ckpt_dir/checkpoint.pt` (InputError when missing or unreadable)."""
    path = Path(ckpt_dir) / CHECKPOINT
    if not path.is_file():
        raise InputError(where(ckpt_dir, "holds no checkpoint to resume from"))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise InputError(where(path, f"cannot be read as a training checkpoint ({type(e).__name__})")) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(where(path, f"is not a synthgate checkpoint of format {FORMAT}"))
    return state
