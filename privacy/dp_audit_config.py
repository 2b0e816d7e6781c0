"""`DPAuditConfig`: the settings of the canary audit of a DP release (`privacy.dp_audit`). Pydantic only (no
torch, scipy or Opacus), so release configs validate it at load time."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DPAuditConfig(BaseModel):
    """Settings of the canary audit.

    canaries: m, the number of gradient canaries (each included with probability 1/2); more canaries raise the most
        the audit can show (`privacy.dp_bound.epsilon_ceiling`) at almost no cost.
    epsilon: the ε the audit run's DP-SGD is calibrated to (small, so that a broken implementation is visible).
    significance: α of the lower bound (it holds with probability ≥ 1 - α).
    seed: which canaries are included, their coordinates and their sampling.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    canaries: int = Field(1000, ge=20)
    epsilon: float = Field(1.0, gt=0, lt=50)
    significance: float = Field(0.05, gt=0, lt=0.5)
    seed: int = Field(0, ge=0)
