"""One training run's objects in one place (`Run`), and its checkpoints: `save_checkpoint_of` writes where the run
is, `resume_from_checkpoint` puts a run back where an interrupted one stopped (same final weights as a run that
was never interrupted).

The strategy's accountant state is restored only once the loader has been fast-forwarded to the resumed batch
(`Run.pending_privacy_state`): a loader that signals the optimizer while sampling (Opacus' BatchMemoryManager)
would leave stale signals the strategy must drop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from synth.checkpoint import capture_rng, has_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from synth.errors import ConfigError, where
from synth.model import ModelConfig
from synth.privacy_strategy import PrivacyStrategy
from synth.train_config import TrainConfig
from synth.train_data import TrainingData
from synth.train_state import RunState
from synth.train_world import World, rank_seed


@dataclass
class Run:
    """Everything one training run holds: built by `synth.training`, driven by `synth.train_loop`."""

    dataset_dir: Path
    out: Path
    config: TrainConfig
    data: TrainingData
    model_cfg: ModelConfig
    device: torch.device
    world: World
    seeds: dict[str, int]
    unet: nn.Module  # the UNet as built (non-private gradient clipping)
    model: nn.Module  # what the forward pass runs on: the UNet, DDP around it, or the strategy's wrapper
    raw: nn.Module  # the plain UNet inside `model` (EMA, checkpoints, the saved weights)
    optimizer: Optimizer
    ema: Any  # diffusers EMAModel
    scheduler: Any  # diffusers DDPMScheduler
    loader: Any
    loader_gen: torch.Generator  # data order
    noise_gen: torch.Generator  # timesteps, noise, condition dropout
    privacy: PrivacyStrategy | None
    ckpt_dir: Path
    planned: int | None  # planned optimizer steps (None: only a time limit)
    batches_per_epoch: int
    state: RunState = field(default_factory=RunState)
    resumed_from: int | None = None
    pending_privacy_state: dict | None = None
    last_saved: int = -1  # step of the last checkpoint written by this process (-1: none)
    init_from: dict | None = None  # the model the weights started from (synth.init_from), for the card
    latent: Any = None  # synth.latent_training.LatentParts of a latent generator (None: pixel space)
    step_fit: dict | None = None  # a DP run's steps fitted to its time cap (synth.step_fit), for card and ledger

    def restore_privacy_state(self) -> None:
        """Hand a resumed accountant state to the strategy (once the loader has been fast-forwarded)."""
        if self.pending_privacy_state is not None and self.privacy is not None:
            self.privacy.load_state_dict(self.pending_privacy_state)
        self.pending_privacy_state = None


SNAPSHOTS = "snapshots"  # in the checkpoint directory: the EMA snapshots taken so far (they survive a resume)


def clean_unet_copy(unet: nn.Module) -> Any:
    """A fresh CPU `UNet2DModel` with `unet`'s weights (the trained module may carry Opacus hooks and per-sample
    gradient attributes)."""
    from diffusers import UNet2DModel

    fresh = UNet2DModel.from_config(unet.config)
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in unet.state_dict().items()})
    return fresh.eval()


def snapshot_due(run: Run) -> bool:
    """Whether the EMA weights after this step are kept (`train.snapshot_every`; the final step's are the
    model's own `unet_ema/`)."""
    every, step = run.config.snapshot_every, run.state.step
    return bool(every) and step % every == 0 and (run.planned is None or step < run.planned)


def save_snapshot_of(run: Run) -> None:
    """Rank 0: save the EMA weights at this step to `<ckpt_dir>/snapshots/step-NNNNNN/` (atomically; a resumed run
    that passes the step again writes the same weights)."""
    if not run.world.main:
        return
    from synth.artifacts import atomic_dir

    ema_unet = clean_unet_copy(run.raw)
    run.ema.copy_to(ema_unet.parameters())
    with atomic_dir(snapshot_path(run.ckpt_dir, run.state.step), overwrite=True) as tmp:
        ema_unet.save_pretrained(tmp)


def snapshot_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / SNAPSHOTS / f"step-{int(step):06d}"


def saved_snapshots(ckpt_dir: Path, *, before: int) -> dict[int, Path]:
    """The snapshots in `ckpt_dir` taken before step `before`, by step."""
    root = Path(ckpt_dir) / SNAPSHOTS
    if not root.is_dir():
        return {}
    found = {int(p.name.split("-", 1)[1]): p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()}
    return {s: p for s, p in sorted(found.items()) if s < before}


def save_checkpoint_of(run: Run) -> None:
    """Write the run's checkpoint (rank 0 writes; the others hold the same state and only note the step)."""
    run.last_saved = run.state.step
    if not run.world.main:
        return
    state = run.state
    rng = capture_rng(state.epoch_rng if state.epoch_rng is not None else run.loader_gen.get_state(), run.noise_gen)
    rng["loader_now"] = run.loader_gen.get_state()
    privacy = None
    if run.privacy is not None:
        privacy = run.pending_privacy_state if run.pending_privacy_state is not None else run.privacy.state_dict()
    save_checkpoint(
        run.ckpt_dir,
        {
            "config": run.config.to_json(),
            "dataset": run.data.dataset_hash,
            "private": run.privacy is not None,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "elapsed_s": state.elapsed_s,
            "examples": state.examples,
            "losses": list(state.losses),
            "model": run.raw.state_dict(),
            "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "rng": rng,
            "privacy": privacy,
            "step_fit": run.step_fit,  # a resumed run keeps this length instead of probing again
        },
    )


def resume_from_checkpoint(run: Run, *, progress: bool) -> None:
    """Load the checkpoint in `run.ckpt_dir` into the run, or (none there) say that training starts at step 0."""
    if not has_checkpoint(run.ckpt_dir):
        if progress and run.world.main:
            print(f"no checkpoint in {run.ckpt_dir}; starting from step 0", file=sys.stderr)
        return
    # Loaded on the CPU: RNG states must stay there; load_state_dict copies weights/moments to the device.
    ckpt = load_checkpoint(run.ckpt_dir, map_location="cpu")
    check_resumable(ckpt, run.ckpt_dir, run.config, run.data.dataset_hash, run.privacy)
    run.raw.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    run.ema.to(run.device)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.pending_privacy_state = ckpt["privacy"] if run.privacy is not None else None
    run.state = RunState(
        step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
        elapsed_s=ckpt["elapsed_s"], examples=ckpt["examples"], losses=list(ckpt["losses"]),
    )
    run.state.epoch_rng = restore_rng(ckpt["rng"], run.noise_gen)
    run.loader_gen.set_state(ckpt["rng"]["loader_now"])
    if not run.world.main:  # the checkpoint holds rank 0's global RNG states
        torch.manual_seed(rank_seed(run.config.seed, run.world.rank, run.state.step))
    run.resumed_from = run.state.step
    run.last_saved = run.state.step


def check_resumable(
    ckpt: dict[str, Any], ckpt_dir: Path, config: TrainConfig, dataset_hash: str, privacy: PrivacyStrategy | None
) -> None:
    """Refuse a checkpoint of another dataset, config or privacy mode (the resumed run would not be the same)."""
    if ckpt.get("dataset") != dataset_hash:
        raise ConfigError(where(ckpt_dir, "checkpoint was made on a different dataset; cannot resume"))
    if ckpt.get("private") != (privacy is not None):
        was = "with" if ckpt.get("private") else "without"
        raise ConfigError(where(ckpt_dir, f"checkpoint was trained {was} DP; resume it the same way"))
    saved = ckpt.get("config") or {}
    now = config.to_json()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in changed[:4])
        raise ConfigError(where(ckpt_dir, f"checkpoint was made with another config ({shown}); cannot resume"))
