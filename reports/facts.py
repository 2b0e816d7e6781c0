"""ReleaseFacts: everything the release documents say, gathered once from the run's artifacts.

The dataset card, the datasheet and the Croissant metadata are rendered from one `ReleaseFacts` value, so every
number they print is read off the artifact chain (dataset header, model card, privacy ledger, audit summaries,
gate verdict, approval) rather than retyped. Facts hold numbers, hashes and short texts only, never pixels:
free-form `details`/`config` dicts are checked to hold plain JSON values of bounded size.

Builders from artifacts: `SourceFacts.from_dataset` (canonical dataset), `ModelFacts.from_model_dir` and
`PrivacyFacts.from_model_dir` (model_card.json, privacy_ledger.json), `PrivacyFacts.from_ledger` (a ledger dict),
`SyntheticFacts.from_dataset` (the generated set: a canonical dataset whose rows are all split "synthetic").
Audit, gate and approval facts are built by their owners from `privacy.json` / `utility.json` / the gate.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synth.errors import InputError, where

SYNTHETIC_SPLIT = "synthetic"
# Training settings and results shown in the documents (the model card holds more, e.g. the loss curve).
_TRAIN_CONFIG_KEYS = ("batch_size", "lr", "epochs", "max_steps", "num_train_timesteps", "cfg_dropout", "ema_decay",
                      "noise_multiplicity", "seed")
_TRAIN_RESULT_KEYS = ("steps", "epochs", "examples_seen", "train_images", "stopped_by", "training_seconds",
                      "device", "final_loss")
# Guards against pixel arrays sneaking into facts through free-form dicts: no list this long is a summary.
MAX_LIST_ITEMS = 1024
MAX_DEPTH = 8


def _check_plain(value: Any, path: str = "details", depth: int = 0) -> None:
    """Raise ValueError unless `value` is small plain JSON (no bytes, arrays, tensors or huge lists)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: key {k!r} is not a string")
            _check_plain(v, f"{path}.{k}", depth + 1)
        return
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"{path}: list of {len(value)} items (> {MAX_LIST_ITEMS}); facts hold summaries only")
        for i, v in enumerate(value):
            _check_plain(v, f"{path}[{i}]", depth + 1)
        return
    raise ValueError(f"{path}: {type(value).__name__} is not plain JSON (facts never hold pixel data or binary)")


class _Facts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _plain_dict(v: Any, info: Any) -> Any:
    _check_plain(v, info.field_name)
    return v


class ImageSpec(_Facts):
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: int = Field(ge=1)


class DuplicateSummary(_Facts):
    """What ingest found and did about exact duplicate images in the source (counts only, no ids)."""

    policy: str
    groups: int = 0
    within_split: int = 0
    across_splits: int = 0
    removed: int = 0
    removed_per_split: dict[str, int] = Field(default_factory=dict)


class SourceFacts(_Facts):
    """The real dataset the model was trained on (never shipped; described and hashed)."""

    name: str
    format: str
    file: str | None = None
    file_sha256: str | None = None
    content_hash: str
    license: str = "unknown"
    attribution: str = ""
    original_source: str = ""
    class_names: tuple[str, ...] = Field(min_length=1)
    counts: dict[str, int]  # per split, plus "total"
    counts_per_class: dict[str, dict[str, int]]  # split -> class name -> count
    image: ImageSpec
    attributes: tuple[str, ...] = ()
    has_patient_id: bool = False
    duplicates: DuplicateSummary | None = None

    @classmethod
    def from_dataset(cls, root: Path, *, name: str | None = None) -> SourceFacts:
        """Facts of a canonical dataset directory, read from its `dataset.json` header."""
        from synth.data.canonical import load_dataset

        ds = load_dataset(Path(root))
        h = ds.info
        src = dict(h.source)
        dup = h.duplicates
        return cls(
            name=name or str(src.get("name") or Path(root).name),
            format=str(src.get("format", "unknown")),
            file=src.get("file"),
            file_sha256=src.get("sha256"),
            content_hash=ds.content_hash,
            license=h.license or "unknown",
            attribution=h.attribution,
            original_source=str(src.get("original_source") or ""),
            class_names=tuple(ds.class_names),
            counts=h.counts.per_split(),
            counts_per_class=h.counts.per_class,
            image=ImageSpec(height=h.image.height, width=h.image.width, channels=h.image.channels),
            attributes=tuple(h.attributes),
            has_patient_id=h.has_patient_id,
            duplicates=(
                DuplicateSummary(**{k: dup[k] for k in DuplicateSummary.model_fields if k in dup})
                if dup.get("policy")
                else None
            ),
        )


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

    _plain = field_validator("epsilon_check")(_plain_dict)

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


class SyntheticFacts(_Facts):
    """The released synthetic set."""

    content_hash: str
    class_names: tuple[str, ...] = Field(min_length=1)
    counts_per_class: dict[str, int]
    image: ImageSpec
    sampler: str | None = None  # e.g. "ddim-25"
    seed_min: int | None = None
    seed_max: int | None = None
    # metadata.csv columns besides file_name and label (image_id, attributes, seed...) and their types
    # ("int64", "float64", "bool" or "string").
    columns: dict[str, Literal["int64", "float64", "bool", "string"]] = Field(default_factory=dict)
    generation: dict[str, Any] = Field(default_factory=dict)  # sampler settings, guidance, batch size, ...

    _plain = field_validator("generation")(_plain_dict)

    @property
    def total(self) -> int:
        return sum(self.counts_per_class.values())

    @classmethod
    def from_dataset(
        cls, root: Path, *, sampler: str | None = None, generation: Mapping[str, Any] | None = None
    ) -> SyntheticFacts:
        """Facts of the generated set (a canonical dataset whose rows are all split 'synthetic').

        `sampler` defaults to the header's `config.sampler_label` (as `synth.generate` writes it), `generation`
        to the header's run `config` plus the condition space; local paths are left out (documents are public).
        """
        from synth.data.canonical import load_dataset

        ds = load_dataset(Path(root))
        meta = ds.metadata
        check_synthetic_only(meta, Path(root))
        h = ds.info
        run = dict(h.config)
        if generation is None:
            gen = {k: v for k, v in run.items() if k != "model"}
            conditions = (h.generation or {}).get("conditions")
            if conditions is not None:
                gen["conditions"] = conditions
        else:
            gen = dict(generation)
        smp = sampler if sampler is not None else (run.get("sampler_label") or gen.get("sampler"))
        if isinstance(smp, Mapping):  # a SamplerConfig dump: show its short label
            schedule = smp.get("step_schedule") or "timesteps"
            smp = f"{smp.get('name')}{'' if schedule == 'timesteps' else '-' + schedule}-{smp.get('steps')}"
        seeds = meta["seed"] if "seed" in meta.columns else None
        names = ds.class_names
        return cls(
            content_hash=ds.content_hash,
            class_names=tuple(names),
            counts_per_class={n: int((meta["label"] == i).sum()) for i, n in enumerate(names)},
            image=ImageSpec(height=h.image.height, width=h.image.width, channels=h.image.channels),
            sampler=None if smp is None else str(smp),
            seed_min=None if seeds is None or seeds.empty else int(seeds.min()),
            seed_max=None if seeds is None or seeds.empty else int(seeds.max()),
            columns=metadata_columns(meta),
            generation=gen,
        )


def check_synthetic_only(meta: Any, root: Path) -> None:
    """InputError unless every row of a canonical dataset is in split 'synthetic' (real data never ships)."""
    splits = sorted(set(meta["split"].astype(str)))
    if splits != [SYNTHETIC_SPLIT]:
        raise InputError(
            where(root, f"holds splits {splits}; only a generated set (all rows split 'synthetic') can be released")
        )
    if "patient_id" in meta.columns:
        raise InputError(where(root, "has a patient_id column; a generated set has no patients"))


# Columns of the canonical metadata that never go into the release's metadata.csv.
_NOT_RELEASED = ("split", "label", "sha256", "patient_id")


def metadata_columns(meta: Any) -> dict[str, str]:
    """The release's metadata.csv extra columns (in order) and their Hugging Face value types."""
    import pandas as pd

    out: dict[str, str] = {}
    for col in meta.columns:
        if col in _NOT_RELEASED:
            continue
        s = meta[col]
        if pd.api.types.is_bool_dtype(s):
            out[col] = "bool"
        elif pd.api.types.is_integer_dtype(s):
            out[col] = "int64"
        elif pd.api.types.is_float_dtype(s):
            out[col] = "float64"
        else:
            out[col] = "string"
    return out


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
