"""`synthgate train`: train the class-conditional DDPM (optionally with DP-SGD) on a canonical dataset, in this
process or (`--nproc N`) in N processes started with torchrun (`synth.distributed`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from synth.errors import ConfigError, InputError, where

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable

_DP_ONLY = ("epsilon", "delta", "max_grad_norm", "accountant", "max_physical_batch_size")


def train_cmd(
    dataset: Annotated[Path, typer.Argument(help="A canonical dataset directory (its train split is used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to create.")],
    preset: Annotated[str | None, typer.Option(
        help="tiny (tests) | small (CPU demo, default) | quality (CPU, ~1 hour) | base (GPU).")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file of TrainConfig keys overriding the preset.")
    ] = None,
    dp: Annotated[bool, typer.Option("--dp", help="Train with DP-SGD (Opacus); needs --epsilon.")] = False,
    epsilon: Annotated[float | None, typer.Option(help="DP: target ε for the whole run.")] = None,
    delta: Annotated[float | None, typer.Option(help="DP: δ (default: a power of ten below 1/(10·N)).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="DP: per-example clipping norm C (default 1.0).")] = None,
    noise_multiplicity: Annotated[
        int | None, typer.Option(help="K noise/timestep draws per example and step (with or without DP).")
    ] = None,
    accountant: Annotated[str | None, typer.Option(help="DP: prv (default) | rdp.")] = None,
    max_physical_batch_size: Annotated[
        int | None, typer.Option(help="DP: split Poisson batches into physical batches of at most this size.")
    ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes of training.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Stop after this many passes over the train split.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (DP: expected Poisson batch).")] = None,
    attribute: Annotated[
        list[str] | None, typer.Option("--attribute", help="Also condition on this metadata column (repeatable).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed (init, data order, noise).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint of an interrupted run.")]
    = False,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Checkpoint folder (default: MODEL.ckpt).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show progress: a bar on a terminal, else throttled lines on stderr.")] = True,
    nproc: Annotated[
        int, typer.Option("--nproc", help="Training processes on this machine (torchrun; DDP, or Opacus' distributed "
                                          "DP-SGD with --dp). Same global batch, steps and ε as one process.")
    ] = 1,
    backend: Annotated[str, typer.Option(help="With --nproc > 1: auto (nccl with a GPU per process, else gloo) | "
                                              "gloo | nccl.")] = "auto",
) -> int:
    """Train the class-conditional diffusion model and write a model directory (weights, EMA weights, scheduler,
    model card, and the privacy ledger with --dp). Ctrl-C saves a checkpoint; rerun with --resume."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be >= 1")
    if nproc == 1 and backend != "auto":
        raise ConfigError(f"--backend {backend} only applies with --nproc > 1")
    dp_values = {
        "epsilon": epsilon, "delta": delta, "max_grad_norm": max_grad_norm, "accountant": accountant,
        "max_physical_batch_size": max_physical_batch_size,
    }
    if not dp:
        given = [f"--{k.replace('_', '-')}" for k in _DP_ONLY if dp_values[k] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --dp")
    else:
        _check_dp_flags(epsilon, delta, max_grad_norm)

    from synth.train_config import load_train_config

    overrides = {
        "max_minutes": max_minutes, "max_steps": max_steps, "epochs": epochs, "batch_size": batch_size,
        "device": device, "seed": seed, "noise_multiplicity": noise_multiplicity,
        "checkpoint_every": checkpoint_every, "condition_attributes": list(attribute) if attribute else None,
    }
    train_config = load_train_config(preset=preset, config_file=config, overrides=overrides)

    strategy = None
    if dp:
        strategy = _make_strategy(
            dataset, train_config.noise_multiplicity, epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm,
            accountant=accountant, max_physical_batch_size=max_physical_batch_size,
        )

    from flows.cli_progress import cli_progress

    with cli_progress(progress) as bar:  # a bar on a terminal, throttled lines on stderr otherwise
        if nproc > 1:
            from synth.distributed import launch_training

            # Each worker builds its own strategy from the config (the one built here has checked it early).
            path = launch_training(dataset, out, train_config, nproc=nproc, backend=backend,
                                   dp=strategy.config.to_dict() if strategy is not None else None,
                                   resume=resume, checkpoint_dir=checkpoint_dir, progress=bar)
        else:
            from synth.training import train

            path = train(dataset, out, train_config, privacy=strategy, progress=bar, resume=resume,
                         checkpoint_dir=checkpoint_dir)

    from synth.artifacts import read_header

    card = read_header(path, "model_card.json", kind="model")
    spent = f", ε={card['privacy']['epsilon']:.3g} (δ={card['privacy']['delta']:.1g})" if card["privacy"] else ""
    console.print(
        f"[green]wrote[/] {path}  ({card['steps']} steps, {card['epochs']:.2f} epochs, "
        f"{card['training_seconds'] / 60:.1f} min on {card['device']}, loss {card['final_loss']:.4f}{spent}; "
        f"stopped by {card['stopped_by']})"
    )
    return 0


def _check_dp_flags(epsilon: float | None, delta: float | None, max_grad_norm: float | None) -> None:
    if epsilon is None:
        raise ConfigError("--dp needs --epsilon (the privacy budget for the whole run, e.g. --epsilon 8)")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"--epsilon {epsilon} must be a finite number > 0")
    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"--delta {delta} must be in (0, 1)")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"--max-grad-norm {max_grad_norm} must be a finite number > 0")


def _make_strategy(dataset: Path, k: int, **dp_args):  # -> privacy.dp.DPStrategy
    try:
        from privacy.dp import DPConfig, make_strategy
    except ImportError as e:
        raise InputError(f"--dp needs privacy.dp, which cannot be imported ({e})") from None
    from synth.data.canonical import load_dataset

    meta = load_dataset(dataset).metadata
    n = int((meta["split"] == "train").sum())
    if n == 0:
        raise InputError(where(dataset, "has no 'train' split to train on"))
    kwargs = {
        "target_epsilon": dp_args["epsilon"],
        "noise_multiplicity": k,
        **{key: dp_args[key] for key in ("max_grad_norm", "accountant", "max_physical_batch_size")
           if dp_args[key] is not None},
    }
    if dp_args["delta"] is not None:
        kwargs["target_delta"] = dp_args["delta"]
    return make_strategy(DPConfig(**kwargs), dataset_size=n)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
