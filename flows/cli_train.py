"""`synthgate train`: train the class-conditional DDPM (optionally with DP-SGD) on a canonical dataset, in this
process or (`--nproc N`) in N processes started with torchrun (`flows.distributed`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from synth.errors import ConfigError, InputError

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable

# DPConfig field → the flag that sets it (flags keep the short names; the config accepts both).
_FLAGS = {"target_epsilon": "--epsilon", "target_delta": "--delta", "max_grad_norm": "--max-grad-norm",
          "accountant": "--accountant", "max_physical_batch_size": "--max-physical-batch-size", "plan": "--dp-plan"}


def train_cmd(
    dataset: Annotated[Path, typer.Argument(help="A canonical dataset directory (its train split is used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to create.")],
    preset: Annotated[str | None, typer.Option(
        help="tiny (tests) | small (CPU demo, default) | quality (CPU, ~1 hour) | base (GPU).")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file of TrainConfig keys overriding the preset.")
    ] = None,
    kind: Annotated[str | None, typer.Option(
        help="auto (default: latent above 32 px on a CPU) | pixel | latent (autoencoder + UNet on its latents).")
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
    dp_plan: Annotated[str | None, typer.Option(
        "--dp-plan", help="DP: manual (default: the settings as given) | auto (batch, steps, physical batch chosen "
                          "from ε, δ, N and the budget max_steps × batch_size; flags you set are kept).")] = None,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Start from this model directory's EMA weights (trained on public data; same image "
                            "shape and preset); a different class set gets a re-initialised class embedding.")] = None,
    public_dataset: Annotated[Path | None, typer.Option(
        "--public-dataset", help="With --init-from: the canonical dataset that model was trained on; refused when "
                                 "any of its images has the pixels of an image in DATASET.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes of training.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    fit_dp_steps: Annotated[bool | None, typer.Option(
        "--fit-dp-steps/--no-fit-dp-steps", help="DP with --max-minutes: time a few steps first and plan only the "
                                                 "steps that fit, so ε is spent in full (default: on).")] = None,
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
        "target_epsilon": epsilon, "target_delta": delta, "max_grad_norm": max_grad_norm, "accountant": accountant,
        "max_physical_batch_size": max_physical_batch_size, "plan": dp_plan,
    }
    dp_config = _dp_config(dp_values) if dp else None
    if not dp:
        given = [_FLAGS[k] for k, v in dp_values.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --dp")

    from synth.train_config import load_train_config

    overrides = {
        "max_minutes": max_minutes, "max_steps": max_steps, "epochs": epochs, "batch_size": batch_size,
        "fit_dp_steps": fit_dp_steps, "device": device, "seed": seed, "noise_multiplicity": noise_multiplicity,
        "kind": kind,
        "checkpoint_every": checkpoint_every, "condition_attributes": list(attribute) if attribute else None,
        "init_from": str(init_from) if init_from is not None else None,
        "init_from_dataset": str(public_dataset) if public_dataset is not None else None,
    }
    train_config = load_train_config(preset=preset, config_file=config, overrides=overrides)
    if dp_config is not None:
        from privacy.dp_plan import apply_plan

        train_config, dp_config = apply_plan(dp_config, train_config, dataset=dataset)
        if dp_config.plan_record is not None:
            chosen = dp_config.plan_record["chosen"]
            console.print("DP plan: " + ", ".join(f"{k}={v}" for k, v in chosen.items())
                          + f" (σ≈{dp_config.plan_record['sigma_estimate']})")

    from flows.cli_progress import cli_progress

    with cli_progress(progress) as bar:  # a bar on a terminal, throttled lines on stderr otherwise
        if nproc > 1:
            from flows.distributed import launch_training

            # The workers build their strategies from this same config (Opacus' objects do not cross processes).
            path = launch_training(dataset, out, train_config, nproc=nproc, backend=backend, dp=dp_config,
                                   resume=resume, checkpoint_dir=checkpoint_dir, progress=bar)
        else:
            from synth.training import train

            strategy = _strategy(dp_config, dataset, train_config.noise_multiplicity) if dp_config else None
            path = train(dataset, out, train_config, privacy=strategy, progress=bar, resume=resume,
                         checkpoint_dir=checkpoint_dir)

    from synth.model_card import read_model_card

    card = read_model_card(path, require_weights=False)
    spent = f", ε={card['privacy']['epsilon']:.3g} (δ={card['privacy']['delta']:.1g})" if card["privacy"] else ""
    loss = f", loss {card['final_loss']:.4f}" if card.get("final_loss") is not None else ""
    console.print(
        f"[green]wrote[/] {path}  ({card['steps']} steps, {card['epochs']:.2f} epochs, "
        f"{card['training_seconds'] / 60:.1f} min on {card['device']}{loss}{spent}; "
        f"stopped by {card['stopped_by']})"
    )
    return 0


def _dp_config(values: dict[str, object]):  # -> privacy.dp_config.DPConfig
    """The DP flags as the one `DPConfig` (its validation, with the flags' names in the message)."""
    if values["target_epsilon"] is None:
        raise ConfigError("--dp needs --epsilon (the privacy budget for the whole run, e.g. --epsilon 8)")
    from privacy.dp_config import DPConfig

    try:
        return DPConfig(**{k: v for k, v in values.items() if v is not None})
    except ConfigError as e:
        message = str(e).removeprefix("DP config: ")
        for field, flag in _FLAGS.items():
            message = message.replace(field, flag)
        raise ConfigError(message) from None


def _strategy(config, dataset: Path, k: int):  # -> privacy.dp.DPStrategy
    try:
        from privacy.dp import build_strategy
    except ImportError as e:
        raise InputError(f"--dp needs privacy.dp, which cannot be imported ({e})") from None
    return build_strategy(config, dataset=dataset, noise_multiplicity=k)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
