"""How the membership audit samples, attacks and reports (`MembershipConfig`), and the limits it works within."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ATTACKS: tuple[str, ...] = ("loss", "pia")
AttackName = Literal["loss", "pia"]
HOLDOUT_SPLITS: tuple[str, ...] = ("val", "test")
MIN_PER_SIDE = 10  # below this an AUC's CI spans most of [0, 1]


class MembershipConfig(BaseModel):
    """How the membership audit samples, attacks and reports. Frozen; `model_dump(mode="json")` is its record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(256, ge=MIN_PER_SIDE)  # members, and as many non-members (fewer when the data has fewer)
    seed: int = Field(0, ge=0)
    # The weights generation used: "ema", "raw" or "ema@STEP" (a kept EMA snapshot the release chose on val).
    weights: str = Field("ema", pattern=r"^(ema|raw|ema@[1-9][0-9]*)$")
    attacks: tuple[AttackName, ...] = ATTACKS
    stratify: bool = True  # same number of members and non-members per condition
    exclude_duplicates: bool = True  # drop holdout images whose pixels are in the train split
    loss_timesteps: tuple[int, ...] = (50, 100, 200)
    loss_noise_draws: int = Field(4, ge=1)
    pia_timestep: int = Field(200, ge=1)
    pia_p: float = Field(4.0, ge=1)
    bootstrap: int = Field(1000, ge=0)  # resamples for the CIs; 0: no CIs
    ci_level: float = Field(0.95, gt=0, lt=1)
    roc_points: int = Field(120, ge=4)  # at most this many ROC points are kept for the plot
    batch_size: int = Field(128, ge=1)  # UNet rows per forward pass
    device: str = "auto"

    @field_validator("attacks")
    @classmethod
    def _check_attacks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"attacks is empty; choose from {list(ATTACKS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"attacks {list(value)} repeats a name")
        return value

    @field_validator("loss_timesteps")
    @classmethod
    def _check_timesteps(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(t < 0 for t in value) or len(set(value)) != len(value):
            raise ValueError(f"loss_timesteps {list(value)} must be distinct timesteps >= 0")
        return tuple(sorted(value))
