"""`PrivacyStrategy`: what the trainer needs from a differential-privacy implementation. `synth` defines the
protocol and never imports an implementation (DP-SGD is `privacy.dp`, wired in by `flows`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader


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


@runtime_checkable
class LatentPrivacy(Protocol):
    """What a privacy strategy adds so a latent generator may train its autoencoder on the private images (DP-SGD:
    `privacy.dp.DPStrategy`). Optional: a strategy without it only trains pixel generators, or latent ones whose
    autoencoder is public (`train.init_from` a latent model trained on public data).

    `can_train_autoencoder` says whether this run may spend part of its budget on the autoencoder;
    `autoencoder_strategy()` (called once, before `attach`) returns the `PrivacyStrategy` that trains it, whose
    spend the strategy then composes with its own (one ledger, one ε).
    """

    @property
    def can_train_autoencoder(self) -> bool: ...

    def autoencoder_strategy(self) -> PrivacyStrategy: ...


@runtime_checkable
class ProbePrivacy(Protocol):
    """What a privacy strategy adds so the trainer can fit a DP run's steps to its time cap (`synth.step_fit`):
    `probe_copy()` returns a fresh strategy with the same settings whose spend is thrown away, for timing a few
    steps on stand-in data before this strategy calibrates σ. Optional: without it the planned steps stay as
    configured."""

    def probe_copy(self) -> PrivacyStrategy: ...
