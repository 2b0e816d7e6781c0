"""What the memorization check compares and how: its spaces and its (frozen, pydantic) config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from privacy.embeddings import LEARNED, PIXEL
from privacy.registration import RegistrationConfig
from privacy.search import SearchConfig

REGISTERED = "registered"
SPACES: tuple[str, ...] = (PIXEL, LEARNED, REGISTERED)
FAISS_SPACES: tuple[str, ...] = (PIXEL, LEARNED)
SpaceName = Literal["pixel", "learned", "registered"]


class MemorizationConfig(BaseModel):
    """What the memorization check compares and how its thresholds are calibrated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantile: float = Field(0.01, gt=0.0, le=0.5)
    calibration: Literal["joint", "per_space"] = "joint"
    near_duplicate_distance: float = Field(0.05, ge=0.0, le=2.0)
    spaces: tuple[SpaceName, ...] = SPACES
    flip_queries: bool = True  # learned space: also query each image's mirror image
    top_k: int = Field(20, ge=1)
    histogram_bins: int = Field(40, ge=2)
    # Synthetic rows are embedded, searched and registered in blocks of this many rows (anchored at global row
    # indices, the last one padded): a shard is whole blocks, so results never depend on the sharding. A set
    # smaller than a block is one block of its own size.
    block_size: int = Field(1024, ge=1)
    search: SearchConfig = SearchConfig()
    registration: RegistrationConfig = RegistrationConfig()

    @field_validator("spaces")
    @classmethod
    def _spaces(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"spaces must be a non-empty list without repeats, got {list(v)}")
        if REGISTERED in v and not set(v) & set(FAISS_SPACES):
            raise ValueError("the registered space verifies candidates from 'pixel' or 'learned': add one of them")
        return tuple(s for s in SPACES if s in v)  # canonical order

    @property
    def candidates(self) -> int:
        """Nearest training rows kept per query view and faiss space (registration candidates, or just 1)."""
        return self.registration.candidates if REGISTERED in self.spaces else 1
