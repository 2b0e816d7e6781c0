"""`DPConfig`: the one DP-SGD settings model, read by `synthgate train`'s flags, the release config's `dp:`
section, the torchrun worker and the trainer's strategy (`privacy.dp.build_strategy`).

Light on purpose (pydantic only, no torch/Opacus), so configs validate it at load time. Opacus-style,
keyword-only names; `epsilon` and `delta` are accepted as aliases of `target_epsilon` and `target_delta`.
The noise multiplicity K is NOT a DP setting: it is `TrainConfig.noise_multiplicity` (it applies with or
without DP), and `build_strategy` takes it from there.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from privacy.ledger import ACCOUNTANTS
from synth.errors import ConfigError, where

# Per-sample gradient modes, all checked against an autograd loop for the shipped UNets (tests/test_dp.py):
#   "hooks"        synthgate's per-sample hooks in place of Opacus' (privacy.grad_sample.use_fast_grad_samples):
#                  no discarded batch weight gradients, nn.Conv2d per-sample gradients from one grouped
#                  convolution backward (layout-safe, no unfold), the K draws of an example averaged as its
#                  gradient is computed. Fastest by measurement.
#   "hooks_unfold" Opacus hooks with Opacus' own unfold-based Conv2d sampler + the Conv2d contiguity guard.
#   "functorch"    Opacus functorch (per-layer vmap; redoes each layer's forward).
# "ew" fails on diffusers; "ghost" clips per row from a per-row loss, so it can neither take the trainer's
# `loss.mean()` nor fold K draws into one example.
GRAD_SAMPLE_MODES = ("hooks", "hooks_unfold", "functorch")
DEFAULT_GRAD_SAMPLE_MODE = "hooks"
_REFUSED_MODES = {
    "ew": "fails on diffusers UNets (ExpandedWeights cannot handle is_floating_point)",
    "ghost": "needs a per-row loss and clips B×K rows separately, so noise multiplicity cannot be folded",
}
_CFG = "DP config"
# A reasoned default, not yet a measured one (benchmarks/README.md "DP autoencoder": the comparison did not finish
# on the shared cores): reconstruction is an easier, lower-dimensional target than denoising, and the UNet's
# samples already lose their class signal at ε = 10 (issue 15), so the autoencoder gets a small share. Composition
# is sub-additive, so the UNet keeps more than 1 - share of ε. Run benchmarks/bench_dp_autoencoder.py to revisit.
AUTOENCODER_SHARE = 0.2
_K_MOVED = "is a training setting (train: noise_multiplicity, or --noise-multiplicity), not a DP one"


def _positive(name: str, value: Any) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} {value!r} must be a finite number > 0")
    return value


def _count(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} {value!r} must be an integer >= 1")
    return value


class DPConfig(BaseModel):
    """DP-SGD settings (keyword-only, frozen; unknown keys refused).

    target_epsilon (alias epsilon): ε for the whole planned run; σ is calibrated to reach it after the planned
        steps.
    target_delta (alias delta): None means `default_delta(N)`, decided in `make_strategy`; must be < 1/N.
    max_grad_norm: clipping norm C of each example's (K-averaged) gradient.
    accountant: "prv" (tight, default) or "rdp".
    poisson_sampling: must stay True (the reported ε assumes it).
    max_physical_batch_size: split logical (Poisson) batches into chunks of at most this many *examples*
        (K·this many rows go through the model at once); None = no splitting. With W processes each computes
        its ~1/W slice of every chunk (the chunks, and so the run, are those of one process).
    grad_sample_mode: "hooks" (default, fastest), "hooks_unfold" or "functorch"; see GRAD_SAMPLE_MODES.
    plan: "manual" (default: train with these settings and the train config as given) or "auto" (batch size,
        steps, physical batch, warmup chosen from ε, δ, N and the compute budget: `privacy.dp_plan`).
    plan_record: set by `privacy.dp_plan.plan_dp` on the config it returns (what was chosen and why); the
        strategy writes it into the ledger as `dp_plan`. Not a user setting.
    autoencoder_share: a latent generator whose autoencoder is trained on the private images trains it with DP-SGD
        at ε = share × target_epsilon on its own; the UNet's σ is then calibrated so that both mechanisms composed
        reach target_epsilon (`DPStrategy.autoencoder_strategy`). 0 forbids training the autoencoder on private
        data: a latent generator then needs a public autoencoder (`train.init_from` a latent model trained on
        public data). Default and why: `AUTOENCODER_SHARE`.

    Construction errors are one-line `ConfigError`s naming the field and the bad value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    target_epsilon: float = Field(validation_alias=AliasChoices("target_epsilon", "epsilon"))
    target_delta: float | None = Field(None, validation_alias=AliasChoices("target_delta", "delta"),
                                       description="default: a power of ten below 1/(10·N)")
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    poisson_sampling: bool = True
    max_physical_batch_size: int | None = None
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE
    plan: Literal["auto", "manual"] = "manual"
    plan_record: dict[str, Any] | None = None
    autoencoder_share: float = AUTOENCODER_SHARE

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(where(_CFG, _explain(e, data))) from None

    def __setattr__(self, name: str, value: Any) -> None:
        # Frozen like a frozen dataclass (pydantic would raise a ValidationError here).
        raise AttributeError(f"DPConfig is frozen: cannot set {name}")

    @field_validator("target_epsilon", "max_grad_norm", mode="before")
    @classmethod
    def _positive(cls, value: Any, info: Any) -> Any:
        return _positive(info.field_name, value)

    @field_validator("target_delta", mode="before")
    @classmethod
    def _delta(cls, value: Any) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if value is not None and not (ok and 0 < value < 1):
            raise ValueError(f"target_delta {value!r} must be in (0, 1)")
        return value

    @field_validator("accountant")
    @classmethod
    def _accountant(cls, value: str) -> str:
        if value not in ACCOUNTANTS:
            raise ValueError(f"accountant {value!r} is not one of {', '.join(ACCOUNTANTS)}")
        return value

    @field_validator("autoencoder_share", mode="before")
    @classmethod
    def _share(cls, value: Any) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and 0 <= value < 1):
            raise ValueError(f"autoencoder_share {value!r} must be a number in [0, 1) (the autoencoder's fraction "
                             "of target_epsilon; 0: no DP autoencoder, a public one is needed)")
        return value

    @field_validator("max_physical_batch_size", mode="before")
    @classmethod
    def _physical(cls, value: Any) -> Any:
        return value if value is None else _count("max_physical_batch_size", value)

    @field_validator("poisson_sampling", mode="before")
    @classmethod
    def _poisson(cls, value: Any) -> Any:
        if value is not True:
            raise ValueError(f"poisson_sampling {value!r}: shuffled batches do not get the Poisson-subsampling ε "
                             "the accountant reports (Chua et al. 2024); keep poisson_sampling=true")
        return value

    @field_validator("grad_sample_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value in _REFUSED_MODES:
            raise ValueError(f"grad_sample_mode {value!r} {_REFUSED_MODES[value]}")
        if value not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode {value!r} is not one of {GRAD_SAMPLE_MODES}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Every field by its canonical name, JSON-ready."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DPConfig:
        """Build from a mapping (a YAML/JSON section); unknown keys are refused."""
        return cls(**dict(d))


def _explain(error: ValidationError, data: dict[str, Any]) -> str:
    """One line: a misplaced K gets its own explanation; every other problem with its field and bad value."""
    if "noise_multiplicity" in data:
        return f"noise_multiplicity {data['noise_multiplicity']!r} {_K_MOVED}"
    problems = []
    for e in error.errors():
        name = ".".join(str(p) for p in e["loc"]) or "value"
        if e["type"] == "missing":
            problems.append(f"{name} is required")
        elif e["type"] == "extra_forbidden":
            problems.append(f"unknown key {name!r}; known: {sorted(DPConfig.model_fields)} (or epsilon, delta)")
        elif e["type"] == "value_error":  # our validators name the field and the value themselves
            problems.append(e["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{name}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(problems)
