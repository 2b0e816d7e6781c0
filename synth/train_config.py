"""`TrainConfig`: every knob of a training run, with presets named by intent.

    tiny   tests and smoke runs: a 0.16M-parameter UNet, seconds on a CPU
    quality a CPU release worth an hour: `small`'s UNet, 2400 steps of 64 or 58 minutes, whichever comes first,
           with an EMA snapshot every 400 steps for the release flow to choose among on real val
    small  the CPU demo: a 1.1M-parameter UNet, 400 steps of 64 or 9 minutes, whichever comes first
           (2 cores, PneumoniaMNIST; 1.13 GFLOP per example and step; ~6 s a step was measured with 5+ other
           jobs on the cores, 1.2-1.5 s is the estimate for a quiet machine: benchmarks/bench_training.py)
    base   a GPU: a 16M-parameter UNet, 50k steps

`kind` (auto | pixel | latent): above 32 px on a CPU a pixel-space UNet costs ~10 s a step (64 px, `small`), so
`auto` trains a latent generator there (an autoencoder, then the UNet on its latents; `autoencoder` holds its
preset-filled config) and a pixel one at 28 px, on a GPU with `base`, and with DP (synth.generator_kind).
For a latent generator `max_minutes` is the whole budget: the autoencoder's time (capped by its own
`autoencoder.max_minutes`: tiny 1, small 4, quality 15) counts against it.

A config names its preset; any field not given takes that preset's value, so `TrainConfig(preset="tiny",
max_steps=5)` is the tiny preset stopped after 5 steps, and a YAML file (`--config`) overrides only what it lists.
The dump (`to_json`) holds every field, so a model card's config rebuilds the exact run.

Why the defaults (short CPU budgets, 28×28 grayscale):
- linear betas (1e-4 … 0.02, T=1000): the DDPM schedule; cosine + DPM-Solver is numerically fragile for briefly
  trained pixel models (STACK-NOTES), and the samplers are derived from this scheduler's config.
- AdamW with a short linear warmup, then cosine decay to 10% over `max_steps` (a fixed step horizon keeps the
  schedule, and so the weights, a function of the step alone: resumable and reproducible).
- EMA with warmup (decay 1-(1+step)^-3/4, capped): a fixed 0.999 over a few hundred steps would mostly average
  the untrained start; the warmup makes the average span roughly the last quarter of a short run.
- no flips or other augmentation: chest X-rays are not left-right symmetric (the heart is on the left).
- 10% condition dropout to the null condition, so the sampler can use classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synth.autoencoder_config import AUTOENCODER_PRESETS, AutoencoderConfig
from synth.config import build, load_yaml

PresetName = Literal["tiny", "small", "quality", "base"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
# What the UNet predicts: the noise (epsilon) or the velocity v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022).
PredictionType = Literal["epsilon", "v_prediction"]
# pixel: the UNet denoises pixels; latent: an autoencoder is trained first and the UNet denoises its latents;
# auto: chosen from the image size, device and DP at training time (synth.generator_kind.resolve_kind).
GeneratorKind = Literal["auto", "pixel", "latent"]

_COMMON: dict[str, Any] = {
    "lr_final_ratio": 0.1,
    "weight_decay": 0.0,
    "adam_betas": (0.9, 0.999),
    "ema_warmup": True,
    "cfg_dropout": 0.1,
    "condition_attributes": "auto",
    "noise_multiplicity": 1,
    "min_snr_gamma": None,
    "prediction_type": "epsilon",
    "class_balance": "auto",
    "seed": 0,
    "device": "auto",
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "grad_clip": 1.0,
    "num_workers": 0,
    "epochs": None,
    "threads": None,
    "kind": "auto",
    "snapshot_every": None,
}

PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "class_balance": 0.0,  # tests and smoke runs keep the data's own order (recipes calibrated on it)
        "batch_size": 32,
        "lr": 2e-3,
        "lr_warmup_steps": 10,
        "lr_schedule": "constant",
        "ema_decay": 0.995,
        "ema_power": 0.75,
        "max_steps": 100,
        "max_minutes": 2.0,
        "checkpoint_every": 50,
    },
    "small": {
        **_COMMON,
        # Per example, batch 64 ran faster than 128 on the 2 shared cores (activations stay in cache) and gives
        # twice the updates; ~400 steps is what fits 9 minutes on a quiet 2-core machine (see the docstring).
        "batch_size": 64,
        "lr": 1e-3,
        "lr_warmup_steps": 40,
        "lr_schedule": "cosine",
        "ema_decay": 0.999,
        "ema_power": 0.75,
        "max_steps": 400,
        "max_minutes": 9.0,
        "checkpoint_every": 100,
    },
    "quality": {
        **_COMMON,
        # The demo's network and batch, 6x the steps, capped at 58 minutes: 51 minutes on one core with one thread
        # (0.79 steps/s, PneumoniaMNIST and HAM10000 at 28 px alike; benchmarks/README.md).
        "batch_size": 64,
        "lr": 1e-3,
        "lr_warmup_steps": 100,
        "lr_schedule": "cosine",
        "ema_decay": 0.9995,
        "ema_power": 0.75,
        "max_steps": 2400,
        "max_minutes": 58.0,
        "checkpoint_every": 200,
        # More steps is not always better (PneumoniaMNIST: TSTR ratio 0.96 at 400 steps, 0.77 at 800; HAM10000:
        # 0.64 -> 0.76), so the EMA weights are kept every 400 steps and the release flow chooses among them on
        # the real validation split, with the guidance scale (reports/guidance.py).
        "snapshot_every": 400,
    },
    "base": {
        **_COMMON,
        "batch_size": 128,
        "lr": 2e-4,
        "lr_warmup_steps": 1000,
        "lr_schedule": "cosine",
        "ema_decay": 0.9999,
        "ema_power": 2 / 3,
        "max_steps": 50_000,
        "max_minutes": None,
        "checkpoint_every": 2000,
    },
}


class TrainConfig(BaseModel):
    """How to train the class-conditional DDPM. Frozen; round-trips through JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: PresetName
    # Optimisation
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_warmup_steps: int = Field(ge=0)
    lr_schedule: Literal["constant", "cosine"]
    lr_final_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    adam_betas: tuple[float, float]
    grad_clip: float | None = Field(gt=0)  # non-private runs only; DP clips per example instead
    # EMA of the weights (diffusers EMAModel), updated after every real optimizer step
    ema_decay: float = Field(ge=0, lt=1)
    ema_warmup: bool
    ema_power: float = Field(gt=0)
    # Stopping: whichever of these comes first (at least one must be set)
    epochs: int | None = Field(ge=1)
    max_steps: int | None = Field(ge=1)
    max_minutes: float | None = Field(gt=0)
    # With DP and max_minutes: time a few steps before σ is calibrated and lower the planned steps to what fits
    # the cap, so the whole ε is spent (synth.step_fit); the fitted length depends on the machine and is recorded.
    fit_dp_steps: bool = True
    # Diffusion and conditioning
    beta_schedule: BetaSchedule
    num_train_timesteps: int = Field(ge=10)
    cfg_dropout: float = Field(ge=0, lt=1)
    # "auto": every categorical attribute the dataset has (usable ones: no gaps, few values); () for labels only.
    condition_attributes: tuple[str, ...] | Literal["auto"]
    noise_multiplicity: int = Field(ge=1)  # K (noise, timestep) draws per example and step
    # Min-SNR-γ loss weighting (None: plain epsilon MSE); see synth.training.per_row_loss.
    min_snr_gamma: float | None = Field(gt=0)
    # epsilon or v_prediction; stored in the model's scheduler config, which every sampler is built from.
    prediction_type: PredictionType
    # Class-balanced batches: an example of class c is drawn with weight n_c^-class_balance (0: the data's own
    # order and prior; 1: every class equally often). Non-private runs only: DP-SGD's accountant assumes uniform
    # Poisson sampling. "auto" (small, quality, base): 1 without DP, 0 with DP (`resolve_class_balance`). See
    # synth.training.make_loader.
    class_balance: Annotated[float, Field(ge=0, le=1)] | Literal["auto"]
    # Run
    checkpoint_every: int | None = Field(ge=1)
    # Keep the EMA weights every this many steps (model dir `unet_ema_snapshots/step-NNNNNN/`) besides the final
    # ones, for the release flow to choose among on real val (None: the final weights only).
    snapshot_every: int | None = Field(ge=1)
    seed: int = Field(ge=0)
    device: str
    num_workers: int = Field(ge=0)
    # Torch threads while training (None: every core this process may run on); see synth.training.train.
    threads: int | None = Field(ge=1)
    # A model directory to start from (public-data pretraining; synth.init_from). None: a fresh UNet.
    init_from: str | None = None
    # The canonical dataset `init_from` was trained on: checked to be that model's data and to share no image
    # (pixel sha256) with the training data (synth.data.overlap); the check is recorded in the model card.
    init_from_dataset: str | None = None
    # Generator kind and, for the latent kind, its autoencoder (filled from the preset; unused by pixel models).
    kind: GeneratorKind
    autoencoder: AutoencoderConfig

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        name = data.get("preset", "small")
        if name not in PRESET_DEFAULTS:
            raise ValueError(f"preset {name!r} is not one of {', '.join(PRESET_DEFAULTS)}")
        # A partial `autoencoder:` mapping overrides the preset's autoencoder field by field.
        autoencoder = data.get("autoencoder")
        if isinstance(autoencoder, Mapping):
            autoencoder = {**AUTOENCODER_PRESETS[name], **autoencoder}
        elif autoencoder is None:
            autoencoder = AUTOENCODER_PRESETS[name]
        return {**PRESET_DEFAULTS[name], **data, "preset": name, "autoencoder": autoencoder}

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        v = value.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")

    @field_validator("adam_betas")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"adam_betas {list(value)} must each be in [0, 1)")
        return value

    @field_validator("condition_attributes")
    @classmethod
    def _check_attributes(cls, value: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if value == "auto":
            return value
        if len(set(value)) != len(value):
            raise ValueError(f"condition_attributes {list(value)} repeats a name")
        if any(not a.strip() for a in value):
            raise ValueError("condition_attributes has an empty name")
        return value

    @model_validator(mode="after")
    def _check_stopping(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None and self.max_minutes is None:
            raise ValueError("set at least one of epochs, max_steps, max_minutes (training would never stop)")
        if self.init_from_dataset is not None and self.init_from is None:
            raise ValueError("init_from_dataset only applies with init_from (the model trained on it)")
        return self

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (what the model card stores)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str | Path = "train config") -> TrainConfig:
        """Rebuild from `to_json` output (or any mapping of fields), with one-line errors."""
        return build(cls, data, source=source)


def load_train_config(
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The preset's defaults, overridden by the YAML `config_file`, overridden by `overrides` (CLI flags; None
    values are ignored). `preset` (if given) wins over a `preset:` key in the file; the default preset is small."""
    data: dict[str, Any] = load_yaml(Path(config_file)) if config_file is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if preset is not None:
        data["preset"] = preset
    if isinstance(data.get("condition_attributes"), str) and data["condition_attributes"] != "auto":
        data["condition_attributes"] = [data["condition_attributes"]]
    return build(TrainConfig, data, source=config_file if config_file is not None else "train config")


def resolve_class_balance(config: TrainConfig, *, private: bool) -> TrainConfig:
    """`config` with `class_balance: auto` made concrete: 1 (every class drawn equally often) without DP, 0 with DP.

    Why 1: the release is generated per class, so the model needs p(image | class) for every class, and a class at
    1% of the data is otherwise barely seen in a CPU budget. Measured (benchmarks/README.md): HAM10000 at 28 px,
    TSTR/TRTR balanced-accuracy ratio 0.43 -> 0.64; PneumoniaMNIST (1:3) 0.963 -> 0.980 at 400 steps, inside the
    intervals. Why 0 with DP: DP-SGD's accounting assumes uniform Poisson sampling."""
    if config.class_balance != "auto":
        return config
    return config.model_copy(update={"class_balance": 0.0 if private else 1.0})
