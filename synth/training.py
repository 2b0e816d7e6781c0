"""Train the class-conditional DDPM on a canonical dataset's train split and write a model directory.

One step: each of the B examples of a batch is repeated K times (`noise_multiplicity`), every row gets its own
timestep and noise (and, with probability `cfg_dropout`, the null condition), the loss of a row is the mean squared
error of the predicted noise over its pixels, and `loss.mean()` over the B·K rows is backpropagated. A privacy
strategy (DP-SGD, built by `privacy.dp`) plugs in through `PrivacyStrategy`; synth never imports privacy.

Reproducibility: one seed derives the UNet init, the data order and the noise/timestep stream (their own
`torch.Generator`s), and the global RNGs. A checkpoint holds every RNG state plus the position in the epoch, so a
resumed run ends with the same weights as an uninterrupted one.

Several processes (`torch.distributed` initialised, e.g. by torchrun through `synth.distributed`): every rank
draws the SAME global batch and the same per-row noise/timesteps as a single-process run (same generators, same
seeds) and computes only its contiguous slice of the batch's examples, so batch size, LR, steps and epochs mean what
they mean in one process, and with one process nothing changes. Without DP the UNet is wrapped in DDP and the loss
is scaled so that DDP's gradient average is the global batch mean; with DP the strategy sets up the distributed
DP-SGD (`PrivacyStrategy.attach`). Rank 0 alone updates the EMA and writes checkpoints and the model directory;
the per-step loss, the signal-triggered stop and the clock are agreed over all ranks after every optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from synth.checkpoint import (
    capture_rng,
    default_checkpoint_dir,
    has_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from synth.conditioning import ConditionSpace
from synth.data.canonical import load_dataset
from synth.device import autocast, describe_device, resolve_device
from synth.errors import ConfigError, InputError, where
from synth.model import ModelConfig, build_unet
from synth.model import preset as model_preset
from synth.model_dir import privacy_summary, write_model_dir
from synth.train_config import TrainConfig

# A categorical attribute with more values than this is almost certainly continuous (age in years, an ID):
# bin it before conditioning on it, or the joint condition space explodes.
MAX_ATTRIBUTE_VALUES = 32
MAX_CONDITIONS = 512
LOSS_WINDOW = 50  # steps averaged for the reported final loss and each point of the loss curve
EPSILON_EVERY_S = 15.0  # recomputing ε costs an accountant call; refresh the progress bar's ε at most this often


@runtime_checkable
class PrivacyStrategy(Protocol):
    """What the trainer needs from a differential-privacy implementation (DP-SGD lives in `privacy.dp`).

    The trainer calls, in order: `attach` once (it returns the wrapped model, optimizer and a Poisson-sampling
    loader whose batches vary in size); per batch of B examples: forward of B·K rows, `loss.mean().backward()`,
    `after_backward(model, B)` (fold the K rows of each per-sample gradient, B·K → B, before the optimizer clips),
    `optimizer.step()`, `optimizer.zero_grad()`; `is_real_step(optimizer)` decides whether that was a real update
    (False while a logical batch is accumulated from physical ones; step counting, EMA and checkpoints only
    follow real steps). For an empty batch (B = 0) the trainer skips forward and backward and calls
    `after_backward(model, 0)`, then `optimizer.step()`: a noise-only step the accountant counts.
    `unwrap(model)` gives the plain UNet (for EMA and saving); `state_dict`/`load_state_dict` carry the
    accountant history through checkpoints (plain types and tensors only); `ledger()` is written as
    `privacy_ledger.json` and must hold at least `delta`, `accountant`, `max_grad_norm` and `steps`.

    In a process group of W > 1 ranks each rank has its own strategy: `attach` must return a loader that yields
    the same global batches on every rank and an optimizer that combines the ranks' gradients; the trainer then
    computes the rank's slice of each batch, so B above is the slice's size (possibly 0 while the batch is not).
    """

    noise_multiplicity: int

    def attach(
        self, model: nn.Module, optimizer: Optimizer, data_loader: DataLoader, *, epochs: int | None,
        steps: int | None,
    ) -> tuple[nn.Module, Optimizer, DataLoader]: ...

    def after_backward(self, model: nn.Module, batch_size: int) -> None: ...

    def is_real_step(self, optimizer: Optimizer) -> bool: ...

    def epsilon(self) -> float: ...

    def ledger(self) -> dict: ...

    def unwrap(self, model: nn.Module) -> nn.Module: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# -- data ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The train split as tensors, plus what the model card needs to describe it."""

    images: torch.Tensor  # uint8 N×C×H×W
    conditions: torch.Tensor  # int64 N
    space: ConditionSpace
    dataset_hash: str
    image: dict[str, int]  # height, width, channels
    condition_counts: list[int]
    license: str = "unknown"  # of the training data; generated sets inherit it (with its attribution)
    attribution: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


class ImageConditionDataset(torch.utils.data.Dataset):
    """(image float C×H×W in [-1, 1], condition index int64) pairs from uint8 images (kept uint8 in memory)."""

    def __init__(self, images: torch.Tensor, conditions: torch.Tensor):
        self.images = images
        self.conditions = conditions

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(127.5).sub_(1.0), self.conditions[index]


def class_balance_weights(labels: np.ndarray, power: float) -> torch.Tensor:
    """Per-example sampling weights n_c^-power for class counts n_c (power 0: uniform over examples, 1: uniform
    over the classes present)."""
    counts = np.bincount(labels)
    return torch.from_numpy(counts[labels].astype(np.float64) ** -power)


def make_loader(data: TrainingData, config: TrainConfig, generator: torch.Generator) -> DataLoader:
    """The training loader: shuffled batches of `config.batch_size` (the last partial batch dropped), or, with
    `config.class_balance` > 0, batches drawn with replacement so that rare classes are seen more often.

    Why balance: with one class at 1% of the data a few hundred steps show its embedding a few hundred examples
    in all, and the generator never learns that class's condition; the released set is generated per class
    anyway, so what the model needs is p(image | class) for every class, not the data's class prior."""
    dataset = ImageConditionDataset(data.images, data.conditions)
    sampler = None
    if config.class_balance > 0:
        labels = data.space.labels_of(data.conditions.numpy())
        sampler = torch.utils.data.WeightedRandomSampler(
            class_balance_weights(labels, config.class_balance), num_samples=len(data), replacement=True,
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,  # fixed-size batches; the dropped remainder differs every epoch
        generator=generator if sampler is None else None,
        num_workers=config.num_workers,
    )


def auto_attributes(meta: pd.DataFrame, candidates: list[str]) -> tuple[str, ...]:
    """The dataset attributes worth conditioning on by default: no missing values, at most MAX_ATTRIBUTE_VALUES
    distinct values, and a joint label × attribute space within MAX_CONDITIONS (attributes taken in order)."""
    chosen: list[str] = []
    combos = max(int(meta["label"].nunique()), 1)
    for name in candidates:
        if name not in meta.columns or meta[name].isna().any():
            continue
        distinct = int(meta[name].astype(str).nunique())
        if 1 < distinct <= MAX_ATTRIBUTE_VALUES and combos * distinct <= MAX_CONDITIONS:
            chosen.append(name)
            combos *= distinct
    return tuple(chosen)


def load_training_data(dataset_dir: Path, attributes: tuple[str, ...] | str = ()) -> TrainingData:
    """Load the **train split** of a canonical dataset and encode each image's condition index.

    `attributes="auto"` conditions on the dataset's usable categorical attributes (`auto_attributes`)."""
    dataset_dir = Path(dataset_dir)
    ds = load_dataset(dataset_dir)
    images, meta = ds.split("train")
    n = len(meta)
    if n == 0:
        splits = sorted(ds.metadata["split"].unique())
        raise InputError(where(dataset_dir, f"has no 'train' split to train on (splits: {splits})"))
    class_names = ds.class_names
    labels = meta["label"].to_numpy()
    if attributes == "auto":
        attributes = auto_attributes(meta, list(ds.header.get("attributes") or []))
    bad = sorted({int(v) for v in labels if not 0 <= v < len(class_names)})
    if bad:
        raise InputError(where(dataset_dir, f"train labels {bad[:5]} outside 0..{len(class_names) - 1}"))
    for name in attributes:
        if name not in meta.columns:
            known = ds.header.get("attributes") or []
            raise ConfigError(where(dataset_dir, f"has no attribute column {name!r} to condition on (has {known})"))
        missing = int(meta[name].isna().sum())
        if missing:
            raise ConfigError(
                where(dataset_dir, f"attribute {name!r} is missing for {missing} of {n} train images; fill or drop")
            )
        distinct = meta[name].astype(str).nunique()
        if distinct > MAX_ATTRIBUTE_VALUES:
            raise ConfigError(
                where(
                    dataset_dir,
                    f"attribute {name!r} has {distinct} distinct values (max {MAX_ATTRIBUTE_VALUES}); bin it first",
                )
            )
    space = ConditionSpace.from_metadata(meta, class_names, attributes)
    if space.num_conditions > MAX_CONDITIONS:
        raise ConfigError(
            where(dataset_dir, f"{space.num_conditions} label×attribute conditions (max {MAX_CONDITIONS})")
        )
    conditions = space.encode_frame(meta)
    array = np.ascontiguousarray(images)
    if array.ndim == 3:
        tensor = torch.from_numpy(array).unsqueeze(1)
    else:
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    return TrainingData(
        images=tensor,
        conditions=torch.from_numpy(conditions.astype(np.int64)),
        space=space,
        dataset_hash=ds.content_hash,
        image={"height": int(tensor.shape[2]), "width": int(tensor.shape[3]), "channels": int(tensor.shape[1])},
        condition_counts=np.bincount(conditions, minlength=space.num_conditions).tolist(),
        license=str(ds.header.get("license", "unknown")),
        attribution=str(ds.header.get("attribution", "")),
    )


def model_config_for(data: TrainingData, preset_name: str, *, where_: Path) -> ModelConfig:
    """The UNet preset for the data's image size, channels and number of conditions."""
    height, width, channels = data.image["height"], data.image["width"], data.image["channels"]
    if height != width:
        raise InputError(where(where_, f"images are {height}×{width}; the UNet presets need square images"))
    try:
        return model_preset(
            preset_name, sample_size=height, channels=channels, num_conditions=data.space.num_conditions
        )
    except (ConfigError, ValueError) as e:  # pydantic wraps validator errors in a ValueError subclass
        raise ConfigError(where(where_, str(e).splitlines()[0])) from None


# -- the diffusion objective ---------------------------------------------------------------------------------


def make_scheduler(config: TrainConfig):  # -> diffusers.DDPMScheduler
    """The training noise schedule (epsilon prediction, x0 clipped to [-1, 1] when sampling)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def per_row_loss(
    unet: nn.Module,
    scheduler: Any,
    images: torch.Tensor,
    conditions: torch.Tensor,
    *,
    null_condition: int,
    generator: torch.Generator,
    noise_multiplicity: int = 1,
    cfg_dropout: float = 0.0,
    amp: contextlib.AbstractContextManager[Any] | None = None,
    part: tuple[int, int] | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE of each of the B·K rows (example i owns rows i·K … i·K+K-1), fp32, shape (B·K,).

    With `min_snr_gamma` γ a row at timestep t is weighted min(SNR(t), γ) / SNR(t) (Min-SNR-γ, Hang et al. 2023):
    the nearly noise-free steps, whose epsilon targets are hard and matter little to samples, stop dominating.

    Timesteps, noise and condition dropout come from `generator` (on the images' device), in that order, always
    drawn for the whole batch. `part=(lo, hi)` then runs the model on examples lo … hi-1 only and returns their
    (hi-lo)·K rows: a rank of a multi-process run computes its slice with exactly the draws a single process would
    give those rows, and leaves the generator where every other rank leaves it (an empty slice skips the model).
    """
    k = int(noise_multiplicity)
    b = int(images.shape[0])
    lo, hi = part if part is not None else (0, b)
    if not 0 <= lo <= hi <= b:
        raise ValueError(f"part {part} is not a slice of a batch of {b}")
    cond = conditions.repeat_interleave(k, dim=0) if k > 1 else conditions
    rows, device = b * k, images.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (rows,), generator=generator, device=device)
    noise = torch.randn((rows, *images.shape[1:]), generator=generator, device=device, dtype=images.dtype)
    if cfg_dropout > 0:
        drop = torch.rand(rows, generator=generator, device=device) < cfg_dropout
        cond = torch.where(drop, torch.full_like(cond, null_condition), cond)
    if part is not None:
        images = images[lo:hi]
        t, noise, cond = t[lo * k : hi * k], noise[lo * k : hi * k], cond[lo * k : hi * k]
        if hi == lo:
            return torch.zeros(0, device=device)
    x0 = images.repeat_interleave(k, dim=0) if k > 1 else images
    noisy = scheduler.add_noise(x0, noise, t)
    with amp if amp is not None else contextlib.nullcontext():
        pred = unet(noisy, t, class_labels=cond).sample
    rows_loss = (pred.float() - noise).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(device)[t].float()
        snr = alpha_bar / (1 - alpha_bar)
        rows_loss = rows_loss * torch.clamp(snr, max=min_snr_gamma) / snr
    return rows_loss


def learning_rate(config: TrainConfig, step: int, total_steps: int | None) -> float:
    """LR for optimizer update number `step` (1-based): linear warmup, then constant or cosine to
    `lr_final_ratio`·lr at `total_steps`. A pure function of the step, so there is no scheduler state."""
    warm = min(1.0, step / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    factor = 1.0
    if config.lr_schedule == "cosine" and total_steps:
        span = max(1, total_steps - config.lr_warmup_steps)
        progress = min(1.0, max(0.0, (step - config.lr_warmup_steps) / span))
        factor = config.lr_final_ratio + (1 - config.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * warm * factor


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for the UNet init, the data order and the noise stream, from one run seed."""
    children = np.random.SeedSequence(seed).spawn(3)
    init, data, noise = (int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in children)
    return {"seed": seed, "init": init, "data_order": data, "noise": noise}


# -- several processes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place in a `torch.distributed` process group (rank 0 of 1 when there is none)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n examples (sizes differ by at most one across ranks)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size


def current_world() -> World:
    """The initialised default process group's rank and size, or a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


def _rank_seed(seed: int, rank: int, step: int) -> int:
    # Ranks > 0 only draw from the global RNG for dropout (DP noise is added on rank 0): give each its own stream.
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _agree(
    world: World, device: torch.device, loss_sum: float, rows: int, elapsed_s: float, received: int | None
) -> tuple[float, int, float, int | None]:
    """One all-reduce after each optimizer step: the global loss sum and row count, rank 0's clock, and whether
    any rank was asked to stop (SIGTERM wins over SIGINT), so every rank takes the same stopping decision."""
    flags = [float(received == signal.SIGTERM), float(received == signal.SIGINT)]
    where_ = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors only
    t = torch.tensor([loss_sum, rows, elapsed_s if world.main else 0.0, *flags], dtype=torch.float64, device=where_)
    torch.distributed.all_reduce(t)
    loss_sum, rows, elapsed_s, term, intr = t.tolist()
    got = signal.SIGTERM if term else signal.SIGINT if intr else None
    return loss_sum, int(rows), elapsed_s, got


def _barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


# -- the training loop ---------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0  # real optimizer steps done
    epoch: int = 0  # complete passes over the loader
    batch_in_epoch: int = 0  # loader batches consumed in the current epoch
    elapsed_s: float = 0.0
    examples: int = 0
    losses: list[float] = field(default_factory=list)  # mean row loss of each real step (NaN: empty batch)
    epoch_rng: torch.Tensor | None = None  # the loader generator's state when the current epoch began


class _Signals:
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


def _planned_steps(config: TrainConfig, batches_per_epoch: int) -> int | None:
    candidates = []
    if config.max_steps is not None:
        candidates.append(config.max_steps)
    if config.epochs is not None:
        candidates.append(config.epochs * batches_per_epoch)
    return min(candidates) if candidates else None


def _check_out(out: Path) -> None:
    if out.exists():
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    if not out.parent.is_dir():
        raise InputError(where(out.parent, "output's parent directory does not exist"))


def cpu_threads(config: TrainConfig) -> int:
    """Torch threads for training: the configured count, else every core this process may run on."""
    if config.threads is not None:
        return config.threads
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
    world = current_world()
    _check_out(out)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out)
    if has_checkpoint(ckpt_dir) and not resume:
        raise InputError(
            where(ckpt_dir, "holds a checkpoint of an interrupted run; pass --resume to continue it, or remove it")
        )
    if privacy is not None:
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
                                      "accounting assumes uniform Poisson sampling; set it to 0 with DP")
            )
        if config.epochs is None and config.max_steps is None:
            raise ConfigError(
                where("train config", "DP training needs epochs or max_steps to calibrate its noise (max_minutes "
                                      "alone gives the accountant no planned length)")
            )

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
    model_cfg = model_config_for(data, config.preset, where_=dataset_dir)
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher picked this rank's GPU
    seeds = derive_seeds(config.seed)

    # Global RNGs: dropout (base preset) and Opacus' noise draw from torch's; seed them all for a fresh run.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    import random

    random.seed(config.seed)
    if not world.main:
        torch.manual_seed(_rank_seed(config.seed, world.rank, 0))

    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    init_rng = torch.get_rng_state()
    torch.manual_seed(seeds["init"])
    unet: UNet2DModel = build_unet(model_cfg).to(device)
    torch.set_rng_state(init_rng)
    unet.train()
    optimizer: Optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay
    )
    ema = EMAModel(
        unet.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, power=config.ema_power,
        model_cls=UNet2DModel, model_config=unet.config,
    )
    scheduler = make_scheduler(config)
    loader_gen = torch.Generator().manual_seed(seeds["data_order"])
    noise_gen = torch.Generator(device=device).manual_seed(seeds["noise"])
    loader: Any = make_loader(data, config, loader_gen)
    batches_per_epoch = len(loader)
    planned = _planned_steps(config, batches_per_epoch)
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

    state = _State()
    resumed_from: int | None = None
    pending_privacy_state: dict | None = None
    if resume and has_checkpoint(ckpt_dir):
        # Loaded on the CPU: RNG states must stay there; load_state_dict copies weights/moments to the device.
        ckpt = load_checkpoint(ckpt_dir, map_location="cpu")
        _check_resumable(ckpt, ckpt_dir, config, data.dataset_hash, privacy)
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        ema.to(device)
        optimizer.load_state_dict(ckpt["optimizer"])
        # The strategy's state is restored after the loader has been fast-forwarded (below): a loader that signals
        # the optimizer while sampling (Opacus' BatchMemoryManager) leaves stale signals the strategy must drop.
        pending_privacy_state = ckpt["privacy"] if privacy is not None else None
        state = _State(
            step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
            elapsed_s=ckpt["elapsed_s"], examples=ckpt["examples"], losses=list(ckpt["losses"]),
        )
        state.epoch_rng = restore_rng(ckpt["rng"], noise_gen)
        loader_gen.set_state(ckpt["rng"]["loader_now"])
        if not world.main:  # the checkpoint holds rank 0's global RNG states
            torch.manual_seed(_rank_seed(config.seed, world.rank, state.step))
        resumed_from = state.step
    elif resume and progress and world.main:
        print(f"no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)

    def _privacy_state() -> dict | None:
        if privacy is None:
            return None
        return pending_privacy_state if pending_privacy_state is not None else privacy.state_dict()

    def checkpoint() -> None:
        if not world.main:
            return
        rng = capture_rng(state.epoch_rng if state.epoch_rng is not None else loader_gen.get_state(), noise_gen)
        rng["loader_now"] = loader_gen.get_state()
        save_checkpoint(
            ckpt_dir,
            {
                "config": config.to_json(),
                "dataset": data.dataset_hash,
                "private": privacy is not None,
                "step": state.step,
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "elapsed_s": state.elapsed_s,
                "examples": state.examples,
                "losses": list(state.losses),
                "model": raw.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng,
                "privacy": _privacy_state(),
            },
        )

    bar = _progress_bar(world.main, show_bar=progress, total=planned, initial=state.step, private=privacy is not None)
    say = (lambda message: _say(bar, message)) if world.main else (lambda message: None)
    amp = autocast(device)
    signals = _Signals()
    stop_reason: str | None = None
    consistent = True  # the in-memory state is exactly "after real step `state.step`"
    last_saved = state.step if resumed_from is not None else -1
    pending_loss, pending_rows = 0.0, 0
    last_eps_time, eps = 0.0, None
    started = time.monotonic() - state.elapsed_s
    optimizer.zero_grad(set_to_none=True)
    try:
        with signals.installed():
            while stop_reason is None:
                stop_reason = _limit_reached(config, state, epoch_end=True)
                if stop_reason is not None:
                    break
                if state.batch_in_epoch == 0:
                    state.epoch_rng = loader_gen.get_state()
                elif state.epoch_rng is not None:  # resuming mid-epoch: replay the epoch's draws, skip used batches
                    loader_gen.set_state(state.epoch_rng)
                batches = iter(loader)
                for _ in range(state.batch_in_epoch):
                    next(batches)
                if pending_privacy_state is not None and privacy is not None:
                    privacy.load_state_dict(pending_privacy_state)
                    pending_privacy_state = None
                for images, conditions in batches:
                    consistent = False
                    state.batch_in_epoch += 1
                    b = int(images.shape[0])  # the global batch: every rank holds all of it
                    lo, hi = world.part(b)
                    if b > 0:
                        rows = per_row_loss(
                            model, scheduler, images.to(device, non_blocking=True),
                            conditions.to(device, non_blocking=True), null_condition=model_cfg.null_condition,
                            generator=noise_gen, noise_multiplicity=config.noise_multiplicity,
                            cfg_dropout=config.cfg_dropout, amp=amp, part=(lo, hi) if world.distributed else None,
                            min_snr_gamma=config.min_snr_gamma,
                        )
                        if rows.shape[0] and privacy is None and world.distributed:
                            # DDP averages the ranks' gradients; slices may differ by one example, so each rank
                            # backpropagates its share of the global mean, times the world size.
                            (rows.sum() * (world.size / (b * config.noise_multiplicity))).backward()
                        elif rows.shape[0]:
                            rows.mean().backward()  # DP: Opacus recovers per-row gradients from the local mean
                        pending_loss += float(rows.detach().sum())
                        pending_rows += rows.shape[0]
                    if privacy is not None:
                        privacy.after_backward(model, hi - lo)
                    elif config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(config, state.step + 1, planned)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.examples += b
                    if privacy is not None and not privacy.is_real_step(optimizer):
                        continue

                    state.step += 1
                    if world.main:
                        ema.step(raw.parameters())
                    state.elapsed_s = time.monotonic() - started
                    agreed: int | None = None
                    if world.distributed:
                        pending_loss, pending_rows, state.elapsed_s, agreed = _agree(
                            world, device, pending_loss, pending_rows, state.elapsed_s, signals.received
                        )
                    loss = pending_loss / pending_rows if pending_rows else float("nan")
                    state.losses.append(loss)
                    pending_loss, pending_rows = 0.0, 0
                    consistent = True

                    if privacy is not None and bar is not None and time.monotonic() - last_eps_time > EPSILON_EVERY_S:
                        eps, last_eps_time = privacy.epsilon(), time.monotonic()
                    _update_bar(bar, state, eps)
                    if on_step is not None:
                        on_step(state.step, loss)
                    # In a process group the ranks stop together: on any rank's signal, as agreed above.
                    received = agreed if world.distributed else signals.received
                    if received is not None:
                        signals.received = received
                        checkpoint()
                        last_saved = state.step
                        _barrier(world)  # keep every rank alive until rank 0's checkpoint is on disk
                        say(f"interrupted: checkpoint at step {state.step} in {ckpt_dir}; rerun with --resume")
                        raise signals.stop()
                    stop_reason = _limit_reached(config, state, epoch_end=False)
                    if stop_reason is not None:
                        break
                    if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                        checkpoint()
                        last_saved = state.step
                else:
                    state.epoch += 1
                    state.batch_in_epoch = 0
    except (KeyboardInterrupt, SystemExit):
        if consistent and state.step != last_saved:
            checkpoint()
            say(f"interrupted: checkpoint at step {state.step} in {ckpt_dir}; rerun with --resume")
        elif last_saved >= 0 and not (consistent and state.step == last_saved):  # else: just said where it went
            say(f"interrupted mid-step: the checkpoint in {ckpt_dir} is from step {last_saved}")
        raise
    finally:
        if bar is not None:
            bar.close()

    if pending_privacy_state is not None and privacy is not None:  # stopped before the loader was reached
        privacy.load_state_dict(pending_privacy_state)
        pending_privacy_state = None
    if state.step == 0:
        raise ConfigError(where(dataset_dir, "training stopped before the first optimizer step"))
    if not world.main:
        _barrier(world)  # returns once rank 0 has written the model (a failure there ends this process group)
        return out
    # The reported loss: mean over the last window of non-empty steps (one batch's loss is too noisy to quote).
    finite = [x for x in state.losses if not math.isnan(x)]
    final_loss = float(np.mean(finite[-LOSS_WINDOW:])) if finite else float("nan")
    curve = [
        {"step": min(i + LOSS_WINDOW, len(state.losses)), "loss": float(np.nanmean(state.losses[i : i + LOSS_WINDOW]))}
        for i in range(0, len(state.losses), LOSS_WINDOW)
        if not all(math.isnan(x) for x in state.losses[i : i + LOSS_WINDOW])
    ]
    # Fresh copies on the CPU: the trained module may carry Opacus hooks and per-sample gradient attributes.
    final_unet = _clean_copy(raw)
    ema_unet = _clean_copy(raw)
    ema.copy_to(ema_unet.parameters())
    summary = ledger = None
    if privacy is not None:
        ledger = privacy.ledger()
        summary = privacy_summary(
            epsilon=privacy.epsilon(), ledger=ledger, noise_multiplicity=privacy.noise_multiplicity
        )
    try:
        write_model_dir(
            out,
            unet=final_unet,
            ema_unet=ema_unet,
            scheduler=scheduler,
            model_config=model_cfg,
            train_config=config.to_json(),
            space=data.space,
            dataset_hash=data.dataset_hash,
            image=data.image,
            condition_counts=data.condition_counts,
            privacy=summary,
            privacy_ledger=ledger,
            extra={
                "seeds": seeds,
                "steps": state.step,
                "epochs": round(state.epoch + state.batch_in_epoch / max(1, batches_per_epoch), 4),
                "examples_seen": state.examples,
                "train_images": len(data),
                "license": data.license,
                "attribution": data.attribution,
                "stopped_by": stop_reason,
                "resumed_from_step": resumed_from,
                "training_seconds": round(state.elapsed_s, 2),
                "device": describe_device(device),
                "final_loss": final_loss,
                "loss_curve": curve,
                "ema": {"decay": config.ema_decay, "warmup": config.ema_warmup, "power": config.ema_power,
                        "updates": ema.optimization_step},
                "torch_version": torch.__version__,
                **({"distributed": {"world_size": world.size, "backend": torch.distributed.get_backend()}}
                   if world.distributed else {}),
            },
        )
    except BaseException:
        # Keep the finished run: a rerun with --resume only has to write the model again.
        if state.step != last_saved:
            checkpoint()
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    _barrier(world)
    return out


def _clean_copy(unet: nn.Module) -> Any:
    from diffusers import UNet2DModel

    fresh = UNet2DModel.from_config(unet.config)
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in unet.state_dict().items()})
    return fresh.eval()


def _limit_reached(config: TrainConfig, state: _State, *, epoch_end: bool) -> str | None:
    """Which stopping rule (if any) the run has met; epochs are only checked between epochs."""
    if config.max_steps is not None and state.step >= config.max_steps:
        return "max_steps"
    if config.max_minutes is not None and state.elapsed_s >= 60 * config.max_minutes:
        return "max_minutes"
    if epoch_end and config.epochs is not None and state.epoch >= config.epochs:
        return "epochs"
    return None


def _check_resumable(
    ckpt: dict[str, Any], ckpt_dir: Path, config: TrainConfig, dataset_hash: str, privacy: PrivacyStrategy | None
) -> None:
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


def _progress_bar(enabled: bool, *, show_bar: bool, total: int | None, initial: int, private: bool) -> Any:
    # Throttled log lines always (the release flow shows them in Prefect's logs); the tqdm bar when asked.
    if not enabled:
        return None
    from synth.progress import Progress

    return Progress("train (DP)" if private else "train", total=total, unit="step", bar=show_bar, initial=initial)


def _update_bar(bar: Any, state: _State, eps: float | None) -> None:
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
