"""Train the class-conditional DDPM on a canonical dataset's train split and write a model directory.

One step: each of the B examples of a batch is repeated K times (`noise_multiplicity`), every row gets its own
timestep and noise (and, with probability `cfg_dropout`, the null condition), the loss of a row is the mean squared
error of the predicted noise over its pixels, and `loss.mean()` over the B·K rows is backpropagated. A privacy
strategy (DP-SGD, built by `privacy.dp`) plugs in through `PrivacyStrategy`; synth never imports privacy.

Reproducibility: one seed derives the UNet init, the data order and the noise/timestep stream (their own
`torch.Generator`s), and the global RNGs. A checkpoint holds every RNG state plus the position in the epoch, so a
resumed run ends with the same weights as an uninterrupted one.

Several processes (`torch.distributed` initialised, e.g. by torchrun through `flows.distributed`): every rank
draws the SAME global batch and the same per-row noise/timesteps as a single-process run (same generators, same
seeds) and computes only its contiguous slice of the batch's examples, so batch size, LR, steps and epochs mean what
they mean in one process, and with one process nothing changes. Without DP the UNet is wrapped in DDP and the loss
is scaled so that DDP's gradient average is the global batch mean; with DP the strategy sets up the distributed
DP-SGD (`PrivacyStrategy.attach`). Rank 0 alone updates the EMA and writes checkpoints and the model directory;
the per-step loss, the signal-triggered stop and the clock are agreed over all ranks after every optimizer step.

A latent generator (`config.kind`, resolved by `synth.generator_kind`) first trains its autoencoder and encodes
the train split (`synth.latent_training`); the same loop then trains the UNet on the latents, and the model
directory gets the autoencoder as `vae/`.

The trainer is split along its seams; this module sets a run up (`_setup`), drives it (`synth.train_loop`) and
writes the model directory (`_finish`), and re-exports the public names of its parts:
    synth.train_data        the train split as tensors, the DataLoader      synth.diffusion_loss  loss, LR, seeds
    synth.train_run         a run's objects, checkpoint and resume          synth.train_loop      the loop
    synth.train_state       position, stopping rules, stop signals          synth.train_world     process group
    synth.train_progress    progress bar and messages                       synth.privacy_strategy  the protocol
    synth.step_fit          a DP run's steps fitted to its time cap (the probe runs here: it needs `_assemble`)
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synth.autoencoder import stderr_say
from synth.checkpoint import default_checkpoint_dir, has_checkpoint
from synth.device import describe_device, resolve_device
from synth.diffusion_loss import derive_seeds, learning_rate, make_scheduler, per_row_loss
from synth.errors import ConfigError, InputError, where
from synth.generator_kind import check_kind_with_dp, resolve_kind
from synth.latent_training import generator_entry, prepare_latent
from synth.model import build_unet
from synth.model_dir import privacy_summary, write_model_dir
from synth.privacy_strategy import PrivacyStrategy, ProbePrivacy
from synth.step_fit import TIME_MARGIN, StepFit, fitted_steps, time_real_steps
from synth.train_config import TrainConfig, resolve_class_balance
from synth.train_data import (
    MAX_ATTRIBUTE_VALUES,
    MAX_CONDITIONS,
    ImageConditionDataset,
    TrainingData,
    auto_attributes,
    load_split_images,
    load_training_data,
    make_loader,
    model_config_for,
)
from synth.train_loop import EPSILON_EVERY_S, run_loop, step_function
from synth.train_run import Run, clean_unet_copy, resume_from_checkpoint, save_checkpoint_of, saved_snapshots
from synth.train_state import RunState, planned_steps
from synth.train_world import World, barrier, current_world, rank_seed

__all__ = [
    "EPSILON_EVERY_S", "LOSS_WINDOW", "MAX_ATTRIBUTE_VALUES", "MAX_CONDITIONS", "ImageConditionDataset",
    "PrivacyStrategy", "TrainingData", "World", "auto_attributes", "cpu_threads", "current_world", "derive_seeds",
    "dp_cut_short", "learning_rate", "load_training_data", "make_loader", "make_scheduler", "model_config_for",
    "per_row_loss", "train",
]

HELDOUT_IMAGES = 256  # val images on which a non-private autoencoder's whole-image PSNR is measured
LOSS_WINDOW = 50  # steps averaged for the reported final loss and each point of the loss curve


WITHHELD_WITH_DP = ("final_loss and loss_curve (and the autoencoder's reconstruction error): computed on the "
                    "private training images outside DP-SGD, so not published with a DP model")


def _check_out(out: Path) -> None:
    if out.exists():
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    if not out.parent.is_dir():
        raise InputError(where(out.parent, "output's parent directory does not exist"))


def cpu_threads(config: TrainConfig) -> int:
    """Torch threads for training: the configured count, else OMP_NUM_THREADS when set (the convention a test
    runner or a batch scheduler sharing the cores uses), else every core this process may run on."""
    if config.threads is not None:
        return config.threads
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def train(
    dataset_dir: Path,
    out: Path,
    config: TrainConfig,
    *,
    privacy: PrivacyStrategy | None = None,
    progress: bool = True,
    resume: bool = False,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train on the train split of the canonical dataset at `dataset_dir` and write the model directory `out`,
    with `cpu_threads(config)` torch threads (restored afterwards).

    The thread count is set here, not inherited: torch starts a new thread at the count last set by *any* thread,
    so in the release flow (training in a worker thread beside the privacy reference, which trains its encoder on
    one thread) training silently ran on 1 of the 2 cores, at half speed.
    """
    config = resolve_class_balance(config, private=privacy is not None)
    previous = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config))
    try:
        return _train(dataset_dir, out, config, privacy=privacy, progress=progress, resume=resume,
                      checkpoint_dir=checkpoint_dir, on_step=on_step)
    finally:
        torch.set_num_threads(previous)



def _train(
    dataset_dir: Path,
    out: Path,
    config: TrainConfig,
    *,
    privacy: PrivacyStrategy | None,
    progress: bool,
    resume: bool,
    checkpoint_dir: Path | None,
    on_step: Callable[[int, float], None] | None,
) -> Path:
    """`train`'s body, at the thread count `train` set.

    Stops at `config.max_steps`, `config.epochs` or `config.max_minutes`, whichever comes first. Checkpoints go
    to `checkpoint_dir` (default `<out>.ckpt/`) every `checkpoint_every` steps and when interrupted (Ctrl-C or
    SIGTERM stop at the next step boundary, save, and re-raise KeyboardInterrupt / SystemExit(143)); with
    `resume`, training continues from that checkpoint (or starts fresh when there is none). The checkpoint
    directory is removed once the model is written. `on_step(step, loss)` is called after every real step.

    Inside an initialised `torch.distributed` process group every rank calls this with the same arguments (and a
    privacy strategy of its own); see the module docstring. Rank 0 writes `out`; the others return `out` once it
    has been written.
    """
    dataset_dir, out = Path(dataset_dir), Path(out)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out)
    _check_request(out, ckpt_dir, config, privacy, resume=resume)
    recorded = _recorded_fit(ckpt_dir) if resume and privacy is not None else None
    run = _setup(dataset_dir, out, config, privacy=privacy, ckpt_dir=ckpt_dir, recorded_fit=recorded)
    if resume:
        resume_from_checkpoint(run, progress=progress)
    stop_reason = run_loop(run, progress=progress, on_step=on_step)
    if run.state.step == 0:
        raise ConfigError(where(dataset_dir, "training stopped before the first optimizer step"))
    if not run.world.main:
        barrier(run.world)  # returns once rank 0 has written the model (a failure there ends this process group)
        return out
    try:
        _finish(run, stop_reason)
    except BaseException:
        # Keep the finished run: a rerun with --resume only has to write the model again.
        if run.state.step != run.last_saved:
            save_checkpoint_of(run)
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    barrier(run.world)
    return out


def _check_request(
    out: Path, ckpt_dir: Path, config: TrainConfig, privacy: PrivacyStrategy | None, *, resume: bool
) -> None:
    """Refuse, before loading anything, an output that exists, a leftover checkpoint without `resume`, and a
    privacy strategy the config cannot serve (another K, or no planned length to calibrate σ for)."""
    _check_out(out)
    if has_checkpoint(ckpt_dir) and not resume:
        raise InputError(
            where(ckpt_dir, "holds a checkpoint of an interrupted run; pass --resume to continue it, or remove it")
        )
    check_kind_with_dp(config.kind, private=privacy is not None, private_latent_ok=_private_latent_ok(config, privacy))
    if privacy is None:
        return
    if privacy.noise_multiplicity != config.noise_multiplicity:
        raise ConfigError(
            where(
                "train config",
                f"noise_multiplicity {config.noise_multiplicity} differs from the privacy strategy's "
                f"K={privacy.noise_multiplicity}; set both the same",
            )
        )
    if config.class_balance:
        raise ConfigError(
            where("train config", f"class_balance {config.class_balance} needs non-private training: DP-SGD's "
                                  "accounting assumes uniform Poisson sampling; set it to 0 or auto with DP")
        )
    if config.epochs is None and config.max_steps is None:
        raise ConfigError(
            where("train config", "DP training needs epochs or max_steps to calibrate its noise (max_minutes "
                                  "alone gives the accountant no planned length)")
        )


def _setup(
    dataset_dir: Path, out: Path, config: TrainConfig, *, privacy: PrivacyStrategy | None, ckpt_dir: Path,
    recorded_fit: StepFit | None = None,
) -> Run:
    """Load the data (and train a latent generator's autoencoder), fit a DP run's steps to its time cap (or apply
    the fit a checkpoint recorded), then build the run (`_assemble`): a fresh run at step 0."""
    world = current_world()
    data = load_training_data(dataset_dir, config.condition_attributes)
    if len(data) < config.batch_size:
        raise InputError(
            where(dataset_dir, f"train split has {len(data)} images, fewer than batch_size {config.batch_size}")
        )
    if world.size > config.batch_size:
        raise ConfigError(
            where("train config", f"batch_size {config.batch_size} is smaller than the {world.size} processes; "
                                  "each process needs examples of its own")
        )
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher picked this rank's GPU
    kind = resolve_kind(config.kind, sample_size=data.image["height"], device=device, preset=config.preset,
                        private=privacy is not None, private_latent_ok=_private_latent_ok(config, privacy),
                        init_kind=_init_kind(config))
    latent = None
    if kind == "latent":
        if world.distributed:
            raise ConfigError(where("train config", "train.kind 'latent' runs in one process; set launch.nproc 1 "
                                                    "or train.kind 'pixel'"))
        # Without DP, the card also gives the autoencoder's PSNR on whole val images (with DP no private figure
        # outside DP-SGD is published).
        heldout = load_split_images(dataset_dir, "val", limit=HELDOUT_IMAGES) if privacy is None else None
        data, model_cfg, latent = prepare_latent(data, config, device=device, ckpt_dir=ckpt_dir,
                                                 where_=dataset_dir, say=stderr_say, privacy=privacy, heldout=heldout)
    else:
        model_cfg = model_config_for(data, config.preset, where_=dataset_dir)
    elapsed = float(latent.record.get("seconds", 0.0)) if latent is not None else 0.0
    config, fit = _fit_steps_to_time(config, data, model_cfg, device=device, world=world, privacy=privacy,
                                     elapsed_s=elapsed, recorded=recorded_fit, dataset_dir=dataset_dir)
    if fit is not None and recorded_fit is None:
        elapsed += fit.probe_seconds  # the probe is part of the training budget
    run = _assemble(dataset_dir, out, config, data, model_cfg, device=device, world=world, privacy=privacy,
                    ckpt_dir=ckpt_dir, latent=latent)
    # A preset's max_minutes is the whole training budget: the autoencoder's minutes (and the probe's) count.
    run.state = RunState(elapsed_s=elapsed)
    run.step_fit = fit.to_dict() if fit is not None else None
    return run


def _assemble(
    dataset_dir: Path, out: Path, config: TrainConfig, data: TrainingData, model_cfg: Any, *, device: torch.device,
    world: World, privacy: PrivacyStrategy | None, ckpt_dir: Path, latent: Any, init: bool = True,
) -> Run:
    """Seed every RNG and build the UNet (from `config.init_from` when `init`), optimizer, EMA, schedule and
    loader for `data`, wrapped for DDP or the privacy strategy: a fresh run at step 0."""
    seeds = derive_seeds(config.seed)

    # Global RNGs: dropout (base preset) and Opacus' noise draw from torch's; seed them all for a fresh run.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if not world.main:
        torch.manual_seed(rank_seed(config.seed, world.rank, 0))

    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    init_rng = torch.get_rng_state()
    torch.manual_seed(seeds["init"])
    unet: UNet2DModel = build_unet(model_cfg).to(device)
    torch.set_rng_state(init_rng)
    # Before the optimizer and EMA see the weights.
    init_from = _load_init(unet, config, model_cfg, data, dataset_dir) if init else None
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay
    )
    ema = EMAModel(
        unet.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, power=config.ema_power,
        model_cls=UNet2DModel, model_config=unet.config,
    )
    scheduler = make_scheduler(config, latent=latent is not None)
    loader_gen = torch.Generator().manual_seed(seeds["data_order"])
    noise_gen = torch.Generator(device=device).manual_seed(seeds["noise"])
    loader: Any = make_loader(data, config, loader_gen)
    batches_per_epoch = len(loader)
    planned = planned_steps(config, batches_per_epoch)
    model: nn.Module = unet
    if privacy is None and world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    if privacy is not None:
        if config.max_steps is not None:
            model, optimizer, loader = privacy.attach(unet, optimizer, loader, epochs=None, steps=planned)
        else:
            model, optimizer, loader = privacy.attach(unet, optimizer, loader, epochs=config.epochs, steps=None)
        model.train()
    raw = privacy.unwrap(model) if privacy is not None else unet
    with contextlib.suppress(TypeError):  # a Poisson loader knows its expected number of batches
        batches_per_epoch = len(loader)
    return Run(
        dataset_dir=dataset_dir, out=out, config=config, data=data, model_cfg=model_cfg, device=device, world=world,
        seeds=seeds, unet=unet, model=model, raw=raw, optimizer=optimizer, ema=ema, scheduler=scheduler,
        loader=loader, loader_gen=loader_gen, noise_gen=noise_gen, privacy=privacy, ckpt_dir=ckpt_dir,
        planned=planned, batches_per_epoch=batches_per_epoch, latent=latent, init_from=init_from,
    )


def _fit_steps_to_time(
    config: TrainConfig, data: TrainingData, model_cfg: Any, *, device: torch.device, world: World,
    privacy: PrivacyStrategy | None, elapsed_s: float, recorded: StepFit | None, dataset_dir: Path,
) -> tuple[TrainConfig, StepFit | None]:
    """The config to train with and its step fit (`synth.step_fit`): with DP, a time cap and `fit_dp_steps`, the
    planned steps lowered to what a probe says fits the time left (a resumed run applies its recorded fit);
    otherwise the config unchanged and None."""
    if recorded is not None:
        return _with_steps(config, recorded), recorded
    if privacy is None or not config.fit_dp_steps or config.max_minutes is None:
        return config, None
    if not isinstance(privacy, ProbePrivacy):
        return config, None  # a strategy that cannot make a throwaway copy of itself
    if world.distributed:
        stderr_say("DP steps not fitted to train.max_minutes: the probe times one process, not a process group")
        return config, None
    started = time.perf_counter()

    def time_left() -> float:
        return 60 * config.max_minutes - elapsed_s - (time.perf_counter() - started)

    planned, probe_steps, per_step = _probe(config, data, model_cfg, device=device, world=world, privacy=privacy,
                                            dataset_dir=dataset_dir, time_left=time_left)
    gc.collect()  # Opacus' hooks hold the probe's UNet in reference cycles: free its memory before the real run
    if planned is None:
        return config, None  # (DP already refused a run without a planned length)
    probe_seconds = time.perf_counter() - started
    budget = 60 * config.max_minutes - elapsed_s - probe_seconds
    steps = fitted_steps(planned, seconds_per_step=per_step, budget_seconds=budget)
    if steps < 1:
        raise ConfigError(where("train config", f"max_minutes {config.max_minutes} leaves no time for a DP step "
                                                f"on this machine ({per_step:.2f} s per step measured, "
                                                f"{max(budget, 0):.0f} s left after setup); raise train.max_minutes"))
    fit = StepFit(requested_steps=planned, steps=steps, seconds_per_step=round(per_step, 4),
                  probe_steps=probe_steps, probe_seconds=round(probe_seconds, 2), budget_seconds=round(budget, 1),
                  margin=TIME_MARGIN)
    if fit.lowered:
        stderr_say(f"DP steps fitted to train.max_minutes {config.max_minutes:g}: {steps} of the {planned} "
                   f"planned fit at {per_step:.2f} s per step, so σ is calibrated for {steps} and the whole ε is "
                   f"spent when they have run; set train.max_steps {steps} and train.fit_dp_steps false to train "
                   "the same weights on another machine")
    return _with_steps(config, fit), fit


def _probe(
    config: TrainConfig, data: TrainingData, model_cfg: Any, *, device: torch.device, world: World,
    privacy: ProbePrivacy, dataset_dir: Path, time_left: Callable[[], float],
) -> tuple[int | None, int, float]:
    """Time real DP steps of this run's network, batch and privacy code (a throwaway copy of the strategy) on
    stand-in data: (the config's planned steps, the steps timed, seconds per step)."""
    probe_cfg = config.model_copy(update={"checkpoint_every": None, "snapshot_every": None})
    # Zeros of the training set's shape: the timing, and so the plan, never depends on the private pixels or
    # labels (0 is a valid condition index).
    stand_in = replace(data, images=torch.zeros_like(data.images), conditions=torch.zeros_like(data.conditions))
    with tempfile.TemporaryDirectory(prefix="synthgate-step-probe-") as tmp:
        probe = _assemble(dataset_dir, Path(tmp) / "model", probe_cfg, stand_in, model_cfg, device=device,
                          world=world, privacy=privacy.probe_copy(), ckpt_dir=Path(tmp) / "ckpt", latent=None,
                          init=False)
        planned = probe.planned
        if planned is None:
            return None, 0, 0.0

        def settled(per_step: float) -> bool:  # a precise rate would not change the plan
            left = time_left()
            return left <= 0 or planned * per_step <= 0.5 * TIME_MARGIN * left

        timed, seconds = time_real_steps(step_function(probe), lambda: probe.privacy.is_real_step(probe.optimizer),
                                         lambda: probe.loader, settled=settled)
    return planned, timed, seconds / timed


def _with_steps(config: TrainConfig, fit: StepFit) -> TrainConfig:
    """`config` planned for the fit's steps (unchanged when they are the requested ones)."""
    if not fit.lowered:
        return config
    return config.model_copy(update={"max_steps": fit.steps})


def _recorded_fit(ckpt_dir: Path) -> StepFit | None:
    """The step fit a checkpoint in `ckpt_dir` was trained under (None: no checkpoint, or no fit), from its JSON
    summary: the weights are loaded once, by the resume itself, whose config check refuses a summary that
    disagrees with them (the fitted `max_steps` is part of the saved config)."""
    if not has_checkpoint(ckpt_dir):
        return None
    from synth.checkpoint import SUMMARY

    try:
        record = json.loads((Path(ckpt_dir) / SUMMARY).read_text()).get("step_fit")
    except (OSError, ValueError, AttributeError):
        return None  # no readable summary: resume without a recorded fit (the config check still applies)
    return StepFit.from_dict(record) if record else None


def _init_kind(config: TrainConfig) -> str | None:
    """The generator kind of the `train.init_from` model (None without one)."""
    if config.init_from is None:
        return None
    from synth.model_card import load_model_card

    return load_model_card(Path(config.init_from)).generator_kind


def _private_latent_ok(config: TrainConfig, privacy: PrivacyStrategy | None) -> bool:
    """Whether a DP run can train a latent generator: its autoencoder is a public model's (a latent
    `train.init_from`) or the strategy can train one with DP (`LatentPrivacy`). See synth.generator_kind."""
    from synth.latent_training import public_vae_dir
    from synth.privacy_strategy import LatentPrivacy

    if public_vae_dir(config) is not None:
        return True
    return isinstance(privacy, LatentPrivacy) and bool(privacy.can_train_autoencoder)


def _load_init(unet: nn.Module, config: TrainConfig, model_cfg: Any, data: TrainingData,
               data_dir: Path) -> dict | None:
    """Start from `config.init_from`'s weights (public pretraining), or keep the fresh init (None)."""
    if config.init_from is None:
        return None
    from synth.init_from import load_init

    public = Path(config.init_from_dataset) if config.init_from_dataset is not None else None
    return load_init(unet, Path(config.init_from), model_cfg=model_cfg, class_names=list(data.space.class_names),
                     image=data.image, dataset_hash=data.dataset_hash, dataset=data_dir, public_dataset=public,
                     prediction_type=config.prediction_type)


def dp_cut_short(stop_reason: str, *, steps: int, planned: int | None, ledger: dict[str, Any]) -> str | None:
    """The warning for a DP run that the time cap stopped before its planned steps (None otherwise): its noise was
    calibrated for the planned steps, so part of the ε budget is left unspent and the model trained less."""
    if stop_reason != "max_minutes" or planned is None or steps >= planned:
        return None
    target = ledger.get("target_epsilon")
    spent = f"ε {ledger.get('epsilon', float('nan')):.3g} spent" + (f" of the {target:g} budgeted" if target else "")
    return (f"warning: DP training stopped at train.max_minutes after {steps} of {planned} planned steps: {spent} "
            "(the noise was calibrated for the planned steps); to spend the budget on this machine, raise "
            "train.max_minutes or lower train.max_steps")


def _finish(run: Run, stop_reason: str) -> None:
    """Rank 0: write the model directory (raw and EMA weights, scheduler, model card, privacy ledger)."""
    state, config, privacy = run.state, run.config, run.privacy
    # The reported loss: mean over the last window of non-empty steps (one batch's loss is too noisy to quote).
    finite = [x for x in state.losses if not math.isnan(x)]
    final_loss = float(np.mean(finite[-LOSS_WINDOW:])) if finite else float("nan")
    curve = [
        {"step": min(i + LOSS_WINDOW, len(state.losses)), "loss": float(np.nanmean(state.losses[i : i + LOSS_WINDOW]))}
        for i in range(0, len(state.losses), LOSS_WINDOW)
        if not all(math.isnan(x) for x in state.losses[i : i + LOSS_WINDOW])
    ]
    # Fresh copies on the CPU: the trained module may carry Opacus hooks and per-sample gradient attributes.
    final_unet = clean_unet_copy(run.raw)
    ema_unet = clean_unet_copy(run.raw)
    run.ema.copy_to(ema_unet.parameters())
    summary = ledger = None
    if privacy is not None:
        ledger = {**privacy.ledger(), "public_pretraining": run.init_from, "step_fit": run.step_fit}
        if run.latent is not None and run.latent.record.get("trained_on") == "public":
            # The strategy never saw this autoencoder: say which public model it is and that ε does not cover it.
            ledger["autoencoder"] = {"trained_with": "public", "frozen": True,
                                     "model": (run.init_from or {}).get("content_hash"),
                                     "covered_by_epsilon": False}
        summary = privacy_summary(
            epsilon=privacy.epsilon(), ledger=ledger, noise_multiplicity=privacy.noise_multiplicity
        )
        short = dp_cut_short(stop_reason, steps=state.step, planned=run.planned, ledger=ledger)
        if short:
            stderr_say(short)
    data, world = run.data, run.world
    write_model_dir(
        run.out,
        unet=final_unet,
        ema_unet=ema_unet,
        scheduler=run.scheduler,
        model_config=run.model_cfg,
        train_config=config.to_json(),
        space=data.space,
        dataset_hash=data.dataset_hash,
        image=data.image,
        condition_counts=data.condition_counts,
        privacy=summary,
        privacy_ledger=ledger,
        init_from=run.init_from,
        vae=run.latent.vae if run.latent is not None else None,
        generator=generator_entry(run.latent),
        snapshots=saved_snapshots(run.ckpt_dir, before=state.step),
        extra={
            "seeds": run.seeds,
            "steps": state.step,
            "epochs": round(state.epoch + state.batch_in_epoch / max(1, run.batches_per_epoch), 4),
            "examples_seen": state.examples,
            "train_images": len(data),
            "license": data.license,
            "attribution": data.attribution,
            "stopped_by": stop_reason,
            "planned_steps": run.planned,
            "step_fit": run.step_fit,
            "resumed_from_step": run.resumed_from,
            "training_seconds": round(state.elapsed_s, 2),
            "device": describe_device(run.device),
            # With DP these are statistics of the private images that DP-SGD does not cover: not published.
            **({"final_loss": final_loss, "loss_curve": curve} if privacy is None else
               {"withheld": WITHHELD_WITH_DP}),
            "ema": {"decay": config.ema_decay, "warmup": config.ema_warmup, "power": config.ema_power,
                    "updates": run.ema.optimization_step},
            "torch_version": torch.__version__,
            **({"distributed": {"world_size": world.size, "backend": torch.distributed.get_backend()}}
               if world.distributed else {}),
        },
    )
