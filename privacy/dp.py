"""DP-SGD for the diffusion trainer: `build_strategy` turns a `DPConfig` (`privacy.dp_config`) into a `DPStrategy`
implementing synth's privacy-strategy protocol.

`synth.training` never imports this package; it receives a strategy object with this shape:

    noise_multiplicity: int
    attach(model, optimizer, data_loader, *, epochs, steps) -> (model, optimizer, data_loader)
    after_backward(model, batch_size) -> None      # fold K rows per example before the optimizer clips
    is_real_step(optimizer) -> bool                # False while physical batches of a logical batch accumulate
    epsilon() -> float ; ledger() -> dict ; unwrap(model) -> nn.Module
    state_dict() -> dict ; load_state_dict(state) -> None

Opacus does the per-sample gradients, clipping, noise and accounting. This module adds what Opacus gets silently
wrong or slow for a diffusers UNet (see `privacy.grad_sample`), splits logical batches into physical ones without
stale optimizer signals (`PhysicalBatches`), calibrates σ to the ε target, and keeps the ledger
(`privacy.ledger`).

Several processes (an initialised `torch.distributed` group of size W > 1): `attach` wraps the model in Opacus'
`DPDDP` (it broadcasts rank 0's weights) so that `make_private` builds the `DistributedDPOptimizer`: each rank
clips its own examples' gradients, rank 0 alone adds the noise N(0, σ²C²), and the clipped sums are all-reduced and
divided by the global expected batch. The Poisson batches, however, are NOT Opacus' distributed sampler's: there
each rank samples its own shard with its own generator (so the global batch is not the one a single process would
draw) and skips its empty local batches (so ranks can disagree on the number of steps). Every rank here runs the
single-process Poisson loader with the same generator, gets the same global batch, and the trainer computes only
the rank's slice of it. σ, q and the number of steps, and so the accountant's ledger and ε, are those of the
single-process run; rank 0's accountant is the one ledger.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

from privacy.dp_config import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, DPConfig
from privacy.grad_sample import (
    fold_noise_multiplicity,
    install_contiguity_guard,
    use_fast_grad_samples,
    use_grouped_conv_sampler,
)
from privacy.ledger import build_ledger, epsilon_for_events, events_from_history
from synth.errors import ConfigError, InputError, where

__all__ = ["DEFAULT_GRAD_SAMPLE_MODE", "GRAD_SAMPLE_MODES", "DPConfig", "DPStrategy", "build_strategy",
           "default_delta", "make_strategy", "resolve_delta"]

_OPACUS_MODE = {"hooks": "hooks", "hooks_unfold": "hooks", "functorch": "functorch"}
_CFG = "DP config"


def default_delta(dataset_size: int) -> float:
    """δ below 1/N: 1/(10·N) rounded down to a power of ten (N=4708 → 1e-5)."""
    if dataset_size < 1:
        raise ConfigError(where(_CFG, f"dataset_size {dataset_size!r} must be >= 1"))
    # Integer arithmetic: the smallest power of ten >= 10·N, so exact powers are not lost to log10 rounding.
    return 10.0 ** -len(str(10 * dataset_size - 1))


def resolve_delta(config: DPConfig, *, dataset_size: int) -> float:
    """The run's δ for a training set of `dataset_size` examples: the configured one, checked < 1/N, or
    `default_delta(N)`. Cheap (no Opacus): launchers call it to refuse a bad δ before starting workers."""
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ConfigError(where(_CFG, f"dataset_size {dataset_size!r} must be an integer >= 1"))
    delta = config.target_delta if config.target_delta is not None else default_delta(dataset_size)
    if delta >= 1 / dataset_size:
        raise ConfigError(
            where(
                _CFG,
                f"target_delta {delta!r} >= 1/N = {1 / dataset_size:.3g} (N={dataset_size}): a mechanism that "
                "publishes one random record meets such a δ; use δ well below 1/N",
            )
        )
    return delta


def build_strategy(config: DPConfig, *, dataset: Path, noise_multiplicity: int) -> DPStrategy:
    """The DP strategy for training on the canonical dataset at `dataset` with the train config's K: the one way
    the CLI, the release flow and every torchrun worker turn a `DPConfig` into a strategy (N is the number of
    rows of the train split, what the trainer's loader iterates)."""
    if config.plan == "auto" and config.plan_record is None:
        raise ConfigError(where(_CFG, "plan 'auto' has not been applied: call privacy.dp_plan.apply_plan first "
                                      "(it chooses the batch, steps and physical batch the strategy trains with)"))
    return make_strategy(config, dataset_size=train_split_size(dataset), noise_multiplicity=noise_multiplicity)


def train_split_size(dataset: Path) -> int:
    """N: the train split's row count (refused when there is none)."""
    from synth.data.canonical import load_dataset

    n = load_dataset(dataset).split_size("train")
    if n == 0:
        raise InputError(where(dataset, "has no 'train' split to train on"))
    return n


def make_strategy(config: DPConfig, *, dataset_size: int, noise_multiplicity: int = 1) -> DPStrategy:
    """A DP strategy for a training set of `dataset_size` examples, each drawn `noise_multiplicity` (K) times per
    step (the train config's K; fixes δ: default or checked < 1/N)."""
    if isinstance(noise_multiplicity, bool) or not isinstance(noise_multiplicity, int) or noise_multiplicity < 1:
        raise ConfigError(where(_CFG, f"noise_multiplicity {noise_multiplicity!r} must be an integer >= 1"))
    delta = resolve_delta(config, dataset_size=dataset_size)
    return DPStrategy(config, dataset_size=dataset_size, target_delta=delta, noise_multiplicity=noise_multiplicity)


class DPStrategy:
    """Opacus DP-SGD behind the trainer's privacy-strategy protocol. Build it with `make_strategy`."""

    def __init__(self, config: DPConfig, *, dataset_size: int, target_delta: float, noise_multiplicity: int = 1):
        from opacus import PrivacyEngine

        self.config = config
        self.dataset_size = dataset_size
        self.target_delta = target_delta
        self.noise_multiplicity = noise_multiplicity
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.batch_size: int | None = None
        self.planned_steps: int | None = None
        self._guard_handles: list = []
        self._optimizer = None
        # Set by PhysicalBatches for the batch it last yielded: whether that batch ends its logical batch.
        self._chunk_is_last: bool | None = None
        self._attached = False
        self._resumed: dict[str, Any] | None = None
        # A latent generator's autoencoder, DP-trained on the same images before this strategy's model: its
        # events are composed into this strategy's accountant (one ledger, one ε).
        self._autoencoder: DPStrategy | None = None
        with warnings.catch_warnings():
            # "Secure RNG turned off": recorded in the ledger instead (torchcsprng has no build for this torch).
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            self._engine = PrivacyEngine(accountant=config.accountant)

    @property
    def accountant(self):
        """The Opacus accountant (its `history` is the ledger's raw material)."""
        return self._engine.accountant

    # -- a latent generator's autoencoder (synth.privacy_strategy.LatentPrivacy) ----------------------------

    @property
    def can_train_autoencoder(self) -> bool:
        """Whether a latent generator may train its autoencoder on the private images (with DP): `autoencoder_share`
        is above 0."""
        return self.config.autoencoder_share > 0

    def autoencoder_strategy(self) -> DPStrategy:
        """The DP strategy that trains a latent generator's autoencoder on the same private images, before this
        strategy attaches to the UNet: ε target `autoencoder_share` × target_epsilon on its own, this strategy's
        δ, N, accountant and clipping norm, one draw per example. Its accountant history is composed into this
        strategy's: `attach` calibrates the UNet's σ so that the autoencoder's mechanism and the UNet's together
        reach target_epsilon, and `ledger()` holds both (with the autoencoder's part named)."""
        if self._attached:
            raise RuntimeError("autoencoder_strategy must be called before attach (its spend precedes the UNet's)")
        if not self.can_train_autoencoder:
            raise ConfigError(where(_CFG, "autoencoder_share 0: the autoencoder may not be trained on the private "
                                          "images; use a public autoencoder (train.init_from a latent model trained "
                                          "on public data)"))
        if self._autoencoder is None:
            share = self.config.autoencoder_share
            cfg = DPConfig(**{**self.config.to_dict(), "target_epsilon": share * self.config.target_epsilon,
                              "plan": "manual", "plan_record": None})
            self._autoencoder = DPStrategy(cfg, dataset_size=self.dataset_size, target_delta=self.target_delta)
        return self._autoencoder

    def probe_copy(self) -> DPStrategy:
        """A fresh strategy with this one's settings and no spend, for the trainer's step-rate probe
        (`synth.step_fit`): it runs on stand-in data and is thrown away, so nothing it does is accounted."""
        # RDP calibrates σ in milliseconds where PRV takes seconds; the probe's σ does not change a step's cost.
        fast = DPConfig(**{**self.config.to_dict(), "accountant": "rdp", "plan": "manual", "plan_record": None})
        return DPStrategy(fast, dataset_size=self.dataset_size, target_delta=self.target_delta,
                          noise_multiplicity=self.noise_multiplicity)

    def _prior_history(self) -> list[tuple[float, float, int]]:
        """The autoencoder's DP-SGD steps, composed before this strategy's own (empty for a pixel generator)."""
        return [] if self._autoencoder is None else list(self._autoencoder.accountant.history)

    def _autoencoder_record(self) -> dict[str, Any] | None:
        ae = self._autoencoder
        if ae is None or not ae.accountant.history:
            return None
        return {
            "trained_with": "dp",
            "share": self.config.autoencoder_share,
            "target_epsilon": ae.config.target_epsilon,
            "epsilon_alone": ae.epsilon(),
            "events": [{"noise_multiplier": float(s), "sample_rate": float(q), "steps": int(n)}
                       for s, q, n in ae.accountant.history],
            "batch_size": ae.batch_size,
            "max_grad_norm": ae.config.max_grad_norm,
            "composition": "the autoencoder's events come first in `events`; `epsilon` composes them with the "
                           "UNet's (one accountant over both), and the UNet's σ was calibrated to that composition",
        }

    # -- protocol -------------------------------------------------------------------------------------------

    def attach(self, model, optimizer, data_loader, *, epochs: int | None = None, steps: int | None = None):
        """Calibrate σ for the planned length and wrap (model, optimizer, data_loader) for DP-SGD (distributed
        DP-SGD inside a process group of more than one rank: see the module docstring).

        Give exactly one of `epochs` (passes over the loader) or `steps` (logical batches), counting the whole
        planned run (on resume: the same total as the first run, so σ comes out identical). The loader must
        iterate the whole training set with the logical batch size; Opacus replaces it with a Poisson sampler at
        rate q = 1/len(loader). With `max_physical_batch_size` the returned loader yields physical batches
        (`PhysicalBatches`); the optimizer then only takes a real step at the end of each logical batch.
        """
        if self._attached:
            raise RuntimeError("DPStrategy.attach called twice; build a new strategy per training run")
        if (epochs is None) == (steps is None):
            raise ConfigError(where(_CFG, f"give exactly one of epochs ({epochs!r}) or steps ({steps!r})"))
        planned = steps if steps is not None else epochs
        if isinstance(planned, bool) or not isinstance(planned, int) or planned < 1:
            raise ConfigError(where(_CFG, f"{'steps' if steps is not None else 'epochs'} {planned!r} must be >= 1"))
        n = len(data_loader.dataset)
        if n != self.dataset_size:
            raise ConfigError(
                where(_CFG, f"data loader has {n} examples but the strategy was made for {self.dataset_size}")
            )
        batches = len(data_loader)
        if batches < 1:
            raise ConfigError(where(_CFG, "data loader yields no batches"))
        self.sample_rate = 1 / batches  # what Opacus' DPDataLoader samples at and accounts with
        self.batch_size = getattr(data_loader, "batch_size", None)
        self.planned_steps = steps if steps is not None else epochs * batches
        self.noise_multiplier = self._calibrate(self.planned_steps)
        self._check_resume()
        if not self.accountant.history:  # (a resumed history, loaded before attach, already holds the prior)
            self.accountant.history = self._prior_history()

        if self.config.grad_sample_mode == "hooks_unfold":
            self._guard_handles = install_contiguity_guard(model)
        _quiet_known_warnings()
        module = model
        if _world_size() > 1:
            from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

            module = DPDDP(model)  # tells make_private to build the DistributedDPOptimizer
        dp_model, dp_optimizer, dp_loader = self._engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=_OPACUS_MODE[self.config.grad_sample_mode],
            loss_reduction="mean",
        )
        if module is not model:
            from opacus.data_loader import DPDataLoader

            # The single-process Poisson loader (same generator on every rank, so the same global batches);
            # make_private's distributed one is dropped unused (see the module docstring).
            dp_loader = DPDataLoader.from_data_loader(data_loader, distributed=False)
            dp_optimizer.reduce_gradients = functools.partial(_reduce_gradients_flat, dp_optimizer)
        if self.config.grad_sample_mode == "hooks" and not use_fast_grad_samples(
            dp_model, noise_multiplicity=self.noise_multiplicity
        ):
            use_grouped_conv_sampler(dp_model)  # a layer type the fast hooks do not cover: Opacus' hooks stay
        if self.config.max_physical_batch_size is not None:
            # Always wrapping is harmless: a Poisson batch at or under the limit passes through as one chunk.
            dp_loader = PhysicalBatches(dp_loader, max_batch_size=self.config.max_physical_batch_size, strategy=self)
        self._optimizer = dp_optimizer
        self._attached = True
        return dp_model, dp_optimizer, dp_loader

    def after_backward(self, model, batch_size: int) -> None:
        """Fold the K noise draws of each example into one per-example gradient (B·K rows → B); see
        `privacy.grad_sample.fold_noise_multiplicity`. For an empty Poisson batch, skip forward/backward and
        call this with `batch_size=0`, then `optimizer.step()`: a noise-only step the accountant counts.

        With physical batches, this also tells the DP optimizer whether the coming `step()` ends the logical
        batch (BatchMemoryManager's signal, sent here rather than when the loader samples: see `PhysicalBatches`).
        """
        fold_noise_multiplicity(model, batch_size=batch_size, multiplicity=self.noise_multiplicity)
        if self._chunk_is_last is not None:
            self._optimizer.signal_skip_step(do_skip=not self._chunk_is_last)
            self._chunk_is_last = None

    def is_real_step(self, optimizer) -> bool:
        """Whether the last `optimizer.step()` updated the weights (False for a physical batch that does not end
        its logical batch: the optimizer only accumulated its clipped gradients)."""
        return not getattr(optimizer, "_is_last_step_skipped", False)

    def epsilon(self) -> float:
        """ε spent so far at the strategy's δ, from the configured accountant."""
        events = events_from_history(self.accountant.history)
        return epsilon_for_events(events, delta=self.target_delta, accountant=self.config.accountant)

    def ledger(self) -> dict[str, Any]:
        """The privacy ledger as a JSON-ready dict (`privacy_ledger.json`), with an independent ε check."""
        return build_ledger(
            self.accountant.history,
            delta=self.target_delta,
            accountant=self.config.accountant,
            max_grad_norm=self.config.max_grad_norm,
            noise_multiplicity=self.noise_multiplicity,
            dataset_size=self.dataset_size,
            target_epsilon=self.config.target_epsilon,
            batch_size=self.batch_size,
            grad_sample_mode=self.config.grad_sample_mode,
            dp_plan=self.config.plan_record,
            autoencoder=self._autoencoder_record(),
        ).to_dict()

    def unwrap(self, model):
        """The plain UNet inside Opacus' GradSampleModule (and DPDDP, in a process group) for EMA and saving. In
        "hooks_unfold" mode the contiguity guard stays on it: numerically a no-op in the forward pass."""
        inner = getattr(model, "_module", model)
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        return inner.module if isinstance(inner, DPDDP) else inner

    def state_dict(self) -> dict[str, Any]:
        """Accountant history and calibration, in plain types, for a checkpoint."""
        return {
            "mechanism": self.config.accountant,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "target_delta": self.target_delta,
            "dataset_size": self.dataset_size,
            "noise_multiplicity": self.noise_multiplicity,
            "max_grad_norm": self.config.max_grad_norm,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the accountant history of an interrupted run, before or after `attach`.

        Refuses a checkpoint from a different DP setup (accountant, N, δ, K, C, or σ/q once attached): the
        resumed run would no longer meet the ε target it was calibrated for.
        """
        try:
            history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            recorded = {k: state[k] for k in ("mechanism", "target_delta", "dataset_size", "noise_multiplicity")}
            recorded["max_grad_norm"] = state["max_grad_norm"]
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(where("DP checkpoint", f"malformed DP state: {err!r}")) from None
        expected = {
            "mechanism": self.config.accountant,
            "target_delta": self.target_delta,
            "dataset_size": self.dataset_size,
            "noise_multiplicity": self.noise_multiplicity,
            "max_grad_norm": self.config.max_grad_norm,
        }
        for key, want in expected.items():
            if recorded[key] != want:
                raise ConfigError(where("DP checkpoint", f"{key} {recorded[key]!r} differs from this run's {want!r}"))
        self._resumed = {"noise_multiplier": state.get("noise_multiplier"), "sample_rate": state.get("sample_rate")}
        if self.batch_size is None:  # a resumed autoencoder run is never attached again: keep its ledger's batch
            self.batch_size = state.get("batch_size")
        self.accountant.history = history
        if self._optimizer is not None:
            # PhysicalBatches never queues signals ahead of a step; drop any a caller's own loader may have left.
            self._optimizer._step_skip_queue.clear()
        if self._attached:
            self._check_resume()

    # -- internals ------------------------------------------------------------------------------------------

    def _calibrate(self, steps: int) -> float:
        try:
            return calibrate_noise_multiplier(
                target_epsilon=self.config.target_epsilon,
                target_delta=self.target_delta,
                sample_rate=self.sample_rate,
                steps=steps,
                accountant=self.config.accountant,
                prior=tuple(self._prior_history()),
            )
        except ValueError as err:
            raise ConfigError(
                where(_CFG, f"target_epsilon {self.config.target_epsilon!r} unreachable for {steps} steps: {err}")
            ) from None

    def _check_resume(self) -> None:
        if self._resumed is None or self.noise_multiplier is None:
            return
        for key, now in (("noise_multiplier", self.noise_multiplier), ("sample_rate", self.sample_rate)):
            then = self._resumed[key]
            if then is not None and not math.isclose(then, now, rel_tol=1e-9):
                raise ConfigError(
                    where(
                        "DP checkpoint",
                        f"{key} was {then!r}, this run calibrates {now!r}: resume with the same data, batch size, "
                        "ε target and planned length",
                    )
                )


class PhysicalBatches:
    """Opacus' BatchMemoryManager, with its signal sent when a batch is used rather than when it is sampled.

    Yields each Poisson (logical) batch of `loader` in balanced chunks of at most `max_batch_size` examples; the
    DP optimizer accumulates the chunks' clipped gradients and takes one real, noised step per logical batch.
    Opacus' BatchSplittingSampler queues the optimizer's "skip / step" signal as it samples, so batches that are
    sampled but never stepped on (a resumed trainer fast-forwarding an epoch, DataLoader prefetch) leave stale
    signals that shift every later step. Here the strategy records whether the chunk just yielded ends its
    logical batch, and `after_backward` sends exactly one signal for the step that follows.
    """

    def __init__(self, loader, *, max_batch_size: int, strategy: DPStrategy):
        self.loader = loader
        self.dataset = loader.dataset
        # In a process group every rank chunks the same global batch the same way (as one process would: the
        # per-row noise is drawn chunk by chunk, so other chunks would train differently) and computes ~1/W of each.
        self.max_batch_size = max_batch_size
        self._strategy = strategy

    def __len__(self) -> int:
        """Expected number of physical batches per epoch (Poisson batch sizes vary)."""
        sampler = self.loader.batch_sampler
        expected = getattr(sampler, "sample_rate", 0) * getattr(sampler, "num_samples", 0)
        return len(self.loader) * max(1, math.ceil(expected / self.max_batch_size))

    def __iter__(self):
        for batch in self.loader:
            n = _batch_len(batch)
            chunks = max(1, math.ceil(n / self.max_batch_size))
            size, extra = divmod(n, chunks)
            start = 0
            for j in range(chunks):
                stop = start + size + (j < extra)
                self._strategy._chunk_is_last = j == chunks - 1
                yield _batch_slice(batch, start, stop)
                start = stop


def _reduce_gradients_flat(optimizer) -> None:
    """DistributedDPOptimizer.reduce_gradients with one all-reduce of all gradients instead of one per parameter
    tensor: 115 gloo all-reduces cost 123 ms per step for the tiny UNet on 2 busy CPU cores, one flat one 1.8 ms.
    Same sum (and, with 2 ranks, bit for bit: a + b in either order), then the same division by the world size."""
    import torch
    import torch.distributed as dist

    params = [p for p in optimizer.params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if optimizer.loss_reduction == "mean":
        flat /= optimizer.world_size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else next(iter(batch.values()))
    return len(first)


def _batch_slice(batch, start: int, stop: int):
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return type(batch)(v[start:stop] for v in batch)


@functools.lru_cache(maxsize=64)
def calibrate_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str,
    prior: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """σ reaching (target_epsilon, target_delta) after `steps` steps at rate q (ε within 0.01 below target),
    composed after the `prior` accountant history (a latent generator's DP autoencoder), if any.

    Without a prior: Opacus' own calibration (what make_private_with_epsilon calls), given steps rather than
    epochs: make_private_with_epsilon recomputes steps as int(epochs / q), which float rounding can leave one short.
    With one: the same binary search over σ, each probe's ε computed by one accountant over the prior's events
    and the new ones (composition, not a sum of ε's). Cached: a PRV binary search takes seconds and is
    deterministic (a resumed run recalibrates identically).
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search probes σ far from the answer, where RDP's order grid is too short; irrelevant to the result.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if prior:
            return _calibrate_after(prior, target_epsilon=target_epsilon, target_delta=target_delta,
                                    sample_rate=sample_rate, steps=steps, accountant=accountant)
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    return float(sigma)


def _calibrate_after(prior: tuple[tuple[float, float, int], ...], *, target_epsilon: float, target_delta: float,
                     sample_rate: float, steps: int, accountant: str, tolerance: float = 0.01) -> float:
    """Opacus' `get_noise_multiplier` search (double σ until under the target, then bisect to within `tolerance`
    below it), with the prior events in every probe's history."""
    from privacy.ledger import DPSGDEvent, epsilon_for_events, events_from_history

    before = events_from_history(prior)
    if epsilon_for_events(before, delta=target_delta, accountant=accountant) >= target_epsilon:
        raise ValueError("the earlier mechanism alone spends the whole budget")

    def eps(sigma: float) -> float:
        event = DPSGDEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return epsilon_for_events((*before, event), delta=target_delta, accountant=accountant)

    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > 2**13:  # Opacus' MAX_SIGMA is 1e6; far past any useful σ either way
            raise ValueError("The privacy budget is too low.")
        eps_high = eps(high)
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        e = eps(mid)
        if e < target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return float(high)


def _quiet_known_warnings() -> None:
    # Harmless, repeated every step: functorch's per-layer vmap meets the int64 class labels (it then does not
    # autocast), and torch notes the first layer's input does not require grad.
    warnings.filterwarnings(
        "ignore", message="In CPU autocast, but the target dtype is not supported", category=UserWarning
    )
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients", category=UserWarning)
