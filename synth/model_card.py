"""The model card (`model_card.json`, header kind "model"): its schema and its one reader.

`synth.model_dir.write_model_dir` writes it; every consumer (generation, audits, the gate, the report, the
release documents) reads it through `load_model_card` (typed) or `read_model_card` (the validated header as a
plain dict, for code that passes it on as JSON). Unknown keys are kept (a newer trainer may record more); the keys
consumers rely on are checked, and a malformed card is one `InputError` line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synth import layout
from synth.errors import InputError, where
from synth.header_schema import HeaderModel, load_header

# The files a loadable model directory holds besides the card (diffusers' save_pretrained layout).
REQUIRED_PARTS = ("model_index.json", "unet", "scheduler")


class ModelPrivacyClaim(BaseModel):
    """The card's `privacy` entry (`synth.model_dir.privacy_summary`): the DP claim in numbers and words."""

    model_config = ConfigDict(frozen=True, extra="allow")

    epsilon: float = Field(ge=0)
    delta: float | None = None
    accountant: str | None = None
    max_grad_norm: float | None = None
    noise_multiplicity: int | None = None
    steps: int | None = None
    ledger: str | None = None
    explanation: str | None = None


class ModelCard(HeaderModel):
    """A model directory's header. Header keys are strict; the body's training results are free-form extras
    (`extra(key)`, e.g. `steps`, `final_loss`, `device`)."""

    conditions: dict[str, Any] | None = None
    class_names: list[str] | None = None
    image: dict[str, Any] | None = None
    condition_counts: list[int] | dict[str, int] | None = None
    weights: dict[str, str | dict[str, str]] | None = None  # folder per weights; "snapshots": step -> folder
    # kind "pixel" or "latent" (with vae folder, latent shape, scaling); absent on cards from before latent models
    generator: dict[str, Any] | None = None
    privacy: ModelPrivacyClaim | None = None

    @property
    def generator_kind(self) -> str:
        """The generator kind: "pixel" or "latent" (cards without a `generator` entry are pixel models)."""
        return str((self.generator or {}).get("kind", "pixel"))

    @property
    def trained_on(self) -> str | None:
        """Content hash of the dataset the model was trained on."""
        return self.inputs.get("dataset")

    @property
    def train_config(self) -> dict[str, Any]:
        """The `TrainConfig` JSON the model was trained with (empty when not recorded)."""
        return dict(self.config.get("train") or {})


def _validated(model_dir: Path) -> tuple[dict[str, Any], ModelCard]:
    return load_header(ModelCard, model_dir, layout.MODEL_CARD, kind=layout.MODEL_KIND, what="model card")


def _check_complete(model_dir: Path) -> None:
    for part in REQUIRED_PARTS:
        if not (model_dir / part).exists():
            raise InputError(where(model_dir, f"is not a complete model directory (no {part})"))


def load_model_card(model_dir: Path, *, require_weights: bool = False) -> ModelCard:
    """The typed model card of `model_dir` (InputError naming the file when missing or malformed). With
    `require_weights`, also check the directory holds the pipeline's parts."""
    model_dir = Path(model_dir)
    card = _validated(model_dir)[1]
    if require_weights:
        _check_complete(model_dir)
    return card


def read_model_card(model_dir: Path, *, require_weights: bool = True) -> dict[str, Any]:
    """The model card header of a (complete, unless `require_weights` is False) model directory, validated by
    `ModelCard` and returned as written: a plain dict, for code that passes it on as JSON. InputError when
    `model_dir` is not a synthgate model."""
    model_dir = Path(model_dir)
    header = _validated(model_dir)[0]
    if require_weights:
        _check_complete(model_dir)
    return header
