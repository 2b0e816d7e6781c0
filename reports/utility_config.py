"""The utility audit's settings (`reports.utility`): `UtilityConfig`, written into the audit's header, and the
`--ratios` parser of `synthgate audit utility`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reports.classifier import ClassifierConfig
from reports.fidelity import FidelityConfig
from synth.errors import InputError, where


class UtilityConfig(BaseModel):
    """Settings of a utility audit (written into the header's `config`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classifier: ClassifierConfig = ClassifierConfig()
    ratios: tuple[float, ...] = Field((0.5, 1.0, 2.0), description="synthetic:real ratios for augmentation")
    n_boot: int = Field(1000, ge=0, le=100_000)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = Field(0, description="seed of bootstrap resampling and augmentation subsets")
    min_subgroup: int = Field(20, ge=1)
    fidelity: bool = True
    fidelity_config: FidelityConfig = FidelityConfig()
    encoder: Path | None = Field(None, description="privacy copy-detection encoder dir, an extra fidelity space")
    inception_weights: Path | None = Field(None, description="Inception TorchScript file, an extra fidelity space")
    max_roc_points: int = Field(500, ge=2)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not np.isfinite(r) or r <= 0 for r in v):
            raise ValueError(f"ratios must be positive numbers, got {list(v)}")
        return tuple(sorted(set(v)))


def parse_ratios(text: str) -> tuple[float, ...]:
    """'0.5,1,2' → (0.5, 1.0, 2.0); an empty string means no augmentation setting."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise InputError(where("--ratios", f"{part!r} is not a number (expected e.g. 0.5,1,2)")) from None
        if not np.isfinite(r) or r <= 0:
            raise InputError(where("--ratios", f"ratios must be positive, got {part!r}"))
        out.append(r)
    return tuple(out)
