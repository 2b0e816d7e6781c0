"""ReleaseFacts: everything the release documents say, gathered once from the run's artifacts.

The dataset card, the datasheet and the Croissant metadata are rendered from one `ReleaseFacts` value, so every
number they print is read off the artifact chain (dataset header, model card, privacy ledger, audit summaries,
gate verdict, approval) rather than retyped. Facts hold numbers, hashes and short texts only, never pixels:
free-form `details`/`config` dicts are checked to hold plain JSON values of bounded size.

Builders from artifacts: `SourceFacts.from_dataset` (canonical dataset), `ModelFacts.from_model_dir` and
`PrivacyFacts.from_model_dir` (model_card.json, privacy_ledger.json), `PrivacyFacts.from_ledger` (a ledger dict),
`SyntheticFacts.from_dataset` (the generated set: a canonical dataset whose rows are all split "synthetic").
Audit, gate and approval facts are built by their owners from `privacy.json` / `utility.json` / the gate.

Modules: `facts_base` (the shared base model and plain-JSON guard), `dataset_facts` (source and synthetic set);
this module holds the model, privacy, audit, gate and approval facts and `ReleaseFacts`, and re-exports the rest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from reports.dataset_facts import (
    SYNTHETIC_SPLIT,
    DuplicateSummary,
    SourceFacts,
    SyntheticFacts,
    check_synthetic_only,
    metadata_columns,
)
from reports.facts_base import MAX_DEPTH, MAX_LIST_ITEMS, ImageSpec
from reports.facts_base import FactsModel as _Facts
from reports.facts_base import plain_dict as _plain_dict
from synth.errors import InputError, where

# Training settings and results shown in the documents (the model card holds more, e.g. the loss curve).
_TRAIN_CONFIG_KEYS = ("batch_size", "lr", "epochs", "max_steps", "num_train_timesteps", "cfg_dropout", "ema_decay",
                      "noise_multiplicity", "seed")
_TRAIN_RESULT_KEYS = ("steps", "epochs", "examples_seen", "train_images", "stopped_by", "training_seconds",
                      "device", "final_loss")

# Re-exported: callers import every fact model from here.
__all__ = [
    "MAX_DEPTH", "MAX_LIST_ITEMS", "SYNTHETIC_SPLIT", "ApprovalFacts", "DuplicateSummary", "Estimate", "GateFacts",
    "ImageSpec", "ModelFacts", "PrivacyAuditFacts", "PrivacyFacts", "ReleaseFacts", "SourceFacts", "SyntheticFacts",
    "UtilityAuditFacts", "check_synthetic_only", "git_commit", "metadata_columns", "synthgate_version",
]


LATENT_ARCHITECTURE = ("class-conditional latent diffusion (diffusers UNet2DModel on the latents of an "
                       "AutoencoderKL trained on the same training split)")
# By where the autoencoder came from (the model card's generator.autoencoder.trained_on).
_LATENT_BY_SOURCE = {
    "train split, with DP-SGD": ("class-conditional latent diffusion (diffusers UNet2DModel on the latents of an "
                                 "AutoencoderKL trained with DP-SGD on the same training split)"),
    "public": ("class-conditional latent diffusion (diffusers UNet2DModel on the latents of a frozen AutoencoderKL "
               "from a model trained on public data)"),
}


def _latent_architecture(card: Any) -> str:
    source = ((card.generator or {}).get("autoencoder") or {}).get("trained_on")
    return _LATENT_BY_SOURCE.get(source, LATENT_ARCHITECTURE)


class ModelFacts(_Facts):
    """The generator: which weights, how they were trained, what they are conditioned on."""

    content_hash: str
    preset: str | None = None
    architecture: str = "class-conditional DDPM (diffusers UNet2DModel)"
    weights: str | None = None  # "ema" or "raw"
    # Key training numbers (steps, epochs, batch size, learning rate, final loss, wall time, device, ...).
    training: dict[str, Any] = Field(default_factory=dict)
    # Condition attributes crossed with the label (name -> values); empty when conditioned on the label only.
    condition_attributes: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    num_conditions: int | None = None
    guidance_scale: float | None = None

    _plain = field_validator("training")(_plain_dict)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelFacts:
        """Facts of a model directory, read from its `model_card.json` (scalar training numbers only)."""
        from synth.model_card import load_model_card

        card = load_model_card(Path(model_dir))
        train = card.train_config
        training = {k: train[k] for k in _TRAIN_CONFIG_KEYS if train.get(k) is not None}
        training |= {k: card.extra(k) for k in _TRAIN_RESULT_KEYS
                     if isinstance(card.extra(k), str | int | float | bool)}
        cond = card.conditions or {}
        return cls(
            content_hash=card.content_hash,
            preset=train.get("preset"),
            weights=(card.weights or {}).get("default"),
            **({"architecture": _latent_architecture(card)} if card.generator_kind == "latent" else {}),
            training=training,
            condition_attributes={a["name"]: tuple(a["values"]) for a in cond.get("attributes", [])},
            num_conditions=cond.get("num_conditions"),
        )



class PrivacyFacts(_Facts):
    """The differential-privacy claim (all None when the model was trained without DP)."""

    dp: bool
    epsilon: float | None = Field(None, ge=0)
    delta: float | None = Field(None, gt=0, lt=1)
    target_epsilon: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    noise_multiplicity: int | None = None  # K noise draws per example, folded into one clipped gradient
    max_grad_norm: float | None = None
    dataset_size: int | None = None
    batch_size: int | None = None
    poisson_sampling: bool | None = None
    secure_rng: bool | None = None
    secure_rng_reason: str | None = None
    privacy_unit: str | None = None
    epsilon_check: dict[str, Any] = Field(default_factory=dict)  # independent recomputation (library, method, ε)
    # The public model training started from (content hash, its data's licence and source): not covered by ε.
    public_pretraining: dict[str, Any] | None = None
    dp_plan: dict[str, Any] | None = None  # how the DP settings were chosen (privacy.dp_plan), when planned
    # A latent generator's autoencoder: trained_with "dp" (share of the target ε, its own ε, composed into ε) or
    # "public" (the public model's hash; not covered by ε). None for a pixel generator.
    autoencoder: dict[str, Any] | None = None
    # The canary audit of the DP implementation (privacy/dp_audit.py): verdict, epsilon_lower_bound,
    # claimed_epsilon (of the audit run), epsilon_ceiling, canaries. Empty when it was not run.
    empirical_audit: dict[str, Any] = Field(default_factory=dict)

    _plain = field_validator("epsilon_check", "empirical_audit")(_plain_dict)

    @model_validator(mode="after")
    def _dp_needs_numbers(self) -> PrivacyFacts:
        if self.dp and (self.epsilon is None or self.delta is None or not self.accountant):
            raise ValueError("a DP claim needs epsilon, delta and accountant")
        if not self.dp and self.epsilon is not None:
            raise ValueError("epsilon given but dp is False")
        return self

    @classmethod
    def not_private(cls) -> PrivacyFacts:
        return cls(dp=False)

    def with_empirical_audit(self, dp_audit_dir: Path | None) -> PrivacyFacts:
        """These facts plus the canary audit's outcome read from `dp_audit_dir` (unchanged without one)."""
        if dp_audit_dir is None or not self.dp:
            return self
        from privacy.dp_audit import read_dp_audit

        h = read_dp_audit(dp_audit_dir)
        keys = ("verdict", "epsilon_lower_bound", "claimed_epsilon", "epsilon_ceiling", "canaries")
        return self.model_copy(update={"empirical_audit": {k: h[k] for k in keys}})

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> PrivacyFacts:
        """The claim of a model directory: its privacy ledger (`privacy.ledger.read_model_ledger`) when present,
        else not private."""
        from privacy.ledger import read_model_ledger
        from synth.layout import PRIVACY_LEDGER

        ledger = read_model_ledger(model_dir)
        if ledger is None:
            return cls.not_private()
        return cls.from_ledger(ledger.to_dict(), source=Path(model_dir) / PRIVACY_LEDGER)

    @classmethod
    def from_ledger(cls, ledger: Mapping[str, Any] | None, *, source: object = "privacy ledger") -> PrivacyFacts:
        """Facts from a privacy ledger dict (`PrivacyLedger.to_dict()`); None means trained without DP.

        With several DP-SGD events (a resumed run with a changed σ or q), the noise multiplier and sample rate
        shown are those of the last event and `steps` is the total; the full event list stays in the ledger.
        """
        if ledger is None:
            return cls.not_private()
        try:
            events = list(ledger.get("events") or [])
            last = events[-1] if events else {}
            steps = ledger.get("steps")
            if steps is None and events:
                steps = sum(int(e["steps"]) for e in events)
            return cls(
                dp=True,
                epsilon=float(ledger["epsilon"]),
                delta=float(ledger["delta"]),
                target_epsilon=ledger.get("target_epsilon"),
                accountant=str(ledger["accountant"]),
                noise_multiplier=last.get("noise_multiplier"),
                sample_rate=last.get("sample_rate"),
                steps=steps,
                noise_multiplicity=ledger.get("noise_multiplicity"),
                max_grad_norm=ledger.get("max_grad_norm"),
                dataset_size=ledger.get("dataset_size"),
                batch_size=ledger.get("batch_size"),
                poisson_sampling=ledger.get("poisson_sampling"),
                secure_rng=ledger.get("secure_rng"),
                secure_rng_reason=ledger.get("secure_rng_reason"),
                privacy_unit=ledger.get("privacy_unit"),
                epsilon_check=dict(ledger.get("epsilon_check") or {}),
                public_pretraining=dict(ledger["public_pretraining"]) if ledger.get("public_pretraining") else None,
                dp_plan=dict(ledger["dp_plan"]) if ledger.get("dp_plan") else None,
                autoencoder=dict(ledger["autoencoder"]) if ledger.get("autoencoder") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(where(source, f"cannot read the privacy claim from the ledger ({e})")) from None


class PrivacyAuditFacts(_Facts):
    """Key numbers of the memorisation / disclosure audit (`privacy.json`)."""

    flagged_fraction_before: float | None = Field(None, ge=0, le=1)  # synthetic images too close to a real one
    flagged_fraction_after: float | None = Field(None, ge=0, le=1)  # ... after filtering them out
    removed: int | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    membership_auc: float | None = Field(None, ge=0, le=1)
    disclosure_k: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    _plain = field_validator("details")(_plain_dict)


class Estimate(_Facts):
    """A metric with an optional confidence interval."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float | None = None  # e.g. 0.95


class UtilityAuditFacts(_Facts):
    """Key numbers of the utility audit (`utility.json`): protocol ('TRTR', 'TRTS', 'TSTR') -> estimate.

    Balanced accuracy and the worst class's sensitivity lead: AUROC ranks and accuracy follows the class prior,
    so either can look good while a classifier never predicts a class. `ratios` are TSTR/TRTR (paired bootstrap)
    by metric; `majority_baseline` is what always predicting the real training set's largest class scores on the
    real test set."""

    balanced_accuracy: dict[str, Estimate] = Field(default_factory=dict)
    worst_class_sensitivity: dict[str, Estimate] = Field(default_factory=dict)
    worst_class: dict[str, str] = Field(default_factory=dict)
    ratios: dict[str, Estimate] = Field(default_factory=dict)
    majority_baseline: dict[str, Any] = Field(default_factory=dict)
    auroc: dict[str, Estimate] = Field(default_factory=dict)
    accuracy: dict[str, Estimate] = Field(default_factory=dict)
    classifier: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    _plain = field_validator("details", "majority_baseline")(_plain_dict)

    @classmethod
    def from_utility(cls, body: Mapping[str, Any], *, classifier: str | None = None) -> UtilityAuditFacts:
        """The key numbers of a `utility.json` body."""

        def estimate(metric: Any) -> Estimate | None:
            if not isinstance(metric, Mapping) or metric.get("value") is None:
                return None
            ci = metric.get("ci") or [None, None]
            return Estimate(value=float(metric["value"]), ci_low=ci[0], ci_high=ci[1], ci_level=0.95)

        def per_protocol(metric: str) -> dict[str, Estimate]:
            found = {p.upper(): estimate((body.get(p) or {}).get(metric)) for p in ("trtr", "trts", "tstr")}
            return {k: v for k, v in found.items() if v is not None}

        paired = body.get("tstr_vs_trtr") or {}
        ratios = {m: estimate((paired.get(m) or {}).get("ratio"))
                  for m in ("balanced_accuracy", "worst_class_sensitivity", "auroc")}
        if ratios["auroc"] is None:
            ratios["auroc"] = estimate(body.get("tstr_over_trtr"))
        majority = ((body.get("baselines") or {}).get("majority_class") or {}).get("real_test") or {}
        return cls(
            balanced_accuracy=per_protocol("balanced_accuracy"),
            worst_class_sensitivity=per_protocol("worst_class_sensitivity"),
            worst_class={p.upper(): str((body.get(p) or {})["worst_class"]) for p in ("trtr", "trts", "tstr")
                         if (body.get(p) or {}).get("worst_class")},
            ratios={k: v for k, v in ratios.items() if v is not None},
            majority_baseline={k: majority[k] for k in ("class", "accuracy", "balanced_accuracy")
                               if k in majority},
            auroc=per_protocol("auroc"),
            accuracy=per_protocol("accuracy"),
            classifier=classifier,
        )


class GateFacts(_Facts):
    verdict: Literal["pass", "block"]
    reasons: tuple[str, ...] = ()
    policy: dict[str, Any] = Field(default_factory=dict)
    loosened: tuple[str, ...] = ()  # rules the steward set below synthgate's defaults (`Policy.loosened`)

    _plain = field_validator("policy")(_plain_dict)


class ApprovalFacts(_Facts):
    """The release decision. `auto_approved`: a scripted run approved it, no human looked."""

    decision: Literal["approved", "rejected"]
    auto_approved: bool
    reviewer: str | None = None
    comment: str = ""
    time: datetime | None = None

    @model_validator(mode="after")
    def _human_needs_name(self) -> ApprovalFacts:
        if not self.auto_approved and not (self.reviewer or "").strip():
            raise ValueError("a human approval needs the reviewer's name")
        return self


def synthgate_version() -> str:
    """The installed synthgate version ('unknown' when not installed as a distribution)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synthgate")
    except PackageNotFoundError:
        return "unknown"


def git_commit(repo: Path | None = None) -> str | None:
    """The checked-out commit of the synthgate source tree (None outside a git checkout or without git)."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if len(commit) == 40 else None


class ReleaseFacts(_Facts):
    """Everything the release documents need. Build it from the artifacts; render documents from it."""

    release_id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    created: datetime = Field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    synthgate_version: str = Field(default_factory=synthgate_version)
    git_commit: str | None = None
    version: str = "1.0.0"  # the release's own version (Croissant `version`)
    # The release's license; None = the source's (synthetic images derived from a CC BY source stay CC BY).
    license: str | None = None
    publisher: str | None = None  # the organisation releasing the data
    contact: str | None = None
    homepage: str | None = None
    purpose: str | None = None  # why this release was made, in the steward's words

    source: SourceFacts
    model: ModelFacts
    privacy: PrivacyFacts
    privacy_audit: PrivacyAuditFacts | None = None
    utility_audit: UtilityAuditFacts | None = None
    gate: GateFacts
    approval: ApprovalFacts | None = None
    synthetic: SyntheticFacts

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseFacts:
        if tuple(self.synthetic.class_names) != tuple(self.source.class_names):
            raise ValueError(
                f"synthetic class names {list(self.synthetic.class_names)} differ from the source's "
                f"{list(self.source.class_names)}"
            )
        if self.synthetic.content_hash == self.source.content_hash:
            raise ValueError("the synthetic set has the source dataset's content hash: it is the real data")
        return self

    @property
    def release_license(self) -> str:
        return self.license or self.source.license

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.synthetic.class_names
