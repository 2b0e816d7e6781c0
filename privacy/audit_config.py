"""What shapes a privacy audit: its config (written into the audit's and the reference's headers), and the names
the audit's artifacts share."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from privacy.embeddings import EncoderConfig
from privacy.membership_config import MembershipConfig
from privacy.memorization_config import MemorizationConfig

SCHEMA_VERSION = 1
ENCODER_DIR = "encoder"


class PrivacyAuditConfig(BaseModel):
    """Everything that shapes a privacy audit (written into the artifact's header)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memorization: MemorizationConfig = MemorizationConfig()
    encoder: EncoderConfig = EncoderConfig()
    # A saved encoder (`privacy.embeddings.save_encoder`) trained on this real dataset's training split; None:
    # train one (EncoderConfig) for this audit.
    encoder_dir: Path | None = None
    disclosure_k: int = Field(5, ge=1)
    disclosure_columns: tuple[str, ...] | None = None
    # Blocking threshold on the share of synthetic images flagged as copies; None: flagged images only warn.
    max_flagged_fraction: float | None = Field(None, ge=0.0, le=1.0)
    ledger_tolerance: float = Field(0.01, ge=0.0, lt=1.0)
    # Membership inference on the model (when a model is given); None skips it.
    membership: MembershipConfig | None = MembershipConfig()
