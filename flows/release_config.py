"""`ReleaseConfig`: one typed config per release (a YAML file), shown as a form in the Prefect UI.

Every stage's settings live here, with defaults that run the whole release on 2 CPU cores in minutes; the policy
(thresholds the gate enforces) sits beside them so one file describes a release completely.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.policy import Policy
from privacy.dp_audit_config import DPAuditConfig
from privacy.dp_config import DPConfig
from synth.config import build, load_yaml
from synth.data.ingest_config import IngestConfig
from synth.train_config import TrainConfig


class SourceSettings(IngestConfig):
    """What to ingest (`synthgate ingest`'s settings, `IngestConfig`), and the validation stage's class minimum."""

    path: str = Field("pneumoniamnist", description="An .npz, a known MedMNIST name, or an image/DICOM folder")
    min_per_class: int = Field(10, ge=0)


def _small_unless_named(value: Any) -> Any:
    # A partial `train:` mapping names a preset and overrides; TrainConfig fills the rest from the preset.
    if isinstance(value, dict) and "preset" not in value:
        return {"preset": "small", **value}
    return value


class DPSettings(DPConfig):
    """Differentially private training (DP-SGD with Opacus): `DPConfig`'s fields (`epsilon`/`delta` accepted as
    aliases), `enabled` (off by default) and a default ε target. K is `train.noise_multiplicity`."""

    enabled: bool = False
    target_epsilon: float = Field(10.0, validation_alias=AliasChoices("target_epsilon", "epsilon"))

    def __init__(self, /, **data: Any) -> None:
        # Plain pydantic errors inside a release config: its loader names the file, `dp.<field>` and the value.
        BaseModel.__init__(self, **data)

    @field_validator("plan_record")
    @classmethod
    def _no_record(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("plan_record is written by dp.plan auto, not set in a release config")
        return value

    def config(self) -> DPConfig:
        """The trainer's DP config (these settings without `enabled`)."""
        return DPConfig(**self.model_dump(exclude={"enabled"}))


class DPAuditSettings(DPAuditConfig):
    """`dp_audit:` the canary audit of a DP release (privacy/dp_audit.py): one extra DP training run, on by default
    for DP releases; `enabled: false` skips it (and the gate then says it was not run)."""

    enabled: bool = True

    def config(self) -> DPAuditConfig:
        """The audit's settings without `enabled`."""
        return DPAuditConfig(**self.model_dump(exclude={"enabled"}))


class GenerateSettings(BaseModel):
    """How many synthetic images, with which sampler and seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int | None = Field(600, ge=1, description="total images, split over the classes by `balance`")
    # Uniform by default: with the real prior (e.g. 26% normal) a classifier trained on the release learnt the
    # prior and almost never predicted the minority class (benchmarks/README.md, "Class balance").
    balance: Literal["uniform", "prior"] = Field(
        "uniform", description="uniform: equal counts per class; prior: the real training prevalence")
    per_class: dict[str, int] | None = Field(None, description="class name -> count (overrides n and balance)")
    sampler: str | None = Field(None, description="a shipped sampler name; default: the measured default")
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | Literal["auto"] | None = Field(
        "auto", description="classifier-free guidance (1 = none); auto (default): chosen on the real validation "
                            "split for the balanced accuracy of a classifier trained on generated images "
                            "(reports/guidance.py); none: the sampler's (1)")
    guidance_selection: dict[str, Any] = Field(default_factory=dict,
                                               description="GuidanceSelectionConfig fields (guidance_scale: auto)")
    weights: str = Field(
        "auto", pattern=r"^(auto|ema|raw|ema@[1-9][0-9]*)$",
        description="which weights generate: auto (default): with guidance_scale auto, chosen with the scale on "
                    "the real validation split among the final EMA weights and the EMA snapshots the model kept "
                    "(train.snapshot_every), else the final EMA weights; ema; raw; ema@STEP (a kept snapshot)")
    batch_size: int = Field(64, ge=1)
    seed: int = Field(0, ge=0)


    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and not 0 <= value <= 50:
            raise ValueError(f"guidance_scale {value} is outside 0..50 (or use auto)")
        return value

    @field_validator("guidance_selection")
    @classmethod
    def _guidance_selection(cls, value: dict[str, Any]) -> dict[str, Any]:
        from reports.guidance import GuidanceSelectionConfig

        GuidanceSelectionConfig.model_validate(value)
        return value


class PublicPretrainingSettings(BaseModel):
    """Pretrain the generator without DP on a *public* dataset, then (DP-)fine-tune it on the private one
    (`flows.stage_public`). The steward declares the public data's licence and source; both go into the model card
    and the privacy ledger, and the DP guarantee covers the private data only. A public set sharing any image
    (pixel sha256) with the private one is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: IngestConfig = Field(description="the public dataset to ingest (ingest settings; size and channels "
                                             "must give the private images' shape)")
    license: str = Field(min_length=1, description="the public data's licence, as declared by the steward")
    attribution: str = Field(min_length=1, description="where the public data comes from (source, citation)")
    train: TrainConfig = Field(TrainConfig(preset="small"), description="pretraining settings (never DP); its "
                                                                        "preset must be the release's train preset")

    _train = field_validator("train", mode="before")(_small_unless_named)

    def ingest_config(self) -> IngestConfig:
        """The ingest settings with the declared licence and source."""
        return self.source.model_copy(update={"license": self.license, "attribution": self.attribution})


class ApprovalSettings(BaseModel):
    """The steward's approval step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    auto_approve: bool = Field(False, description="scripted runs and tests only; recorded in the datasheet")
    timeout_s: int = Field(24 * 3600, ge=1, description="how long the flow waits for a steward's decision")


class RunnerSettings(BaseModel):
    """Where the release's tasks run (see `flows/runners.py`). Generation, the memorization search and the utility
    classifiers run as mapped tasks over `shards`; merged outputs are byte-identical to a single-shard run with
    the same seed and per-worker thread count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["threads", "dask", "ray"] = Field("threads", description="threads: this process (default)")
    address: str | None = Field(None, description="a running Dask scheduler (tcp://host:8786) or Ray cluster; "
                                                  "none: start a local cluster of `workers` processes")
    workers: int = Field(2, ge=1, description="local cluster worker processes (thread pool: concurrent tasks)")
    threads_per_worker: int = Field(1, ge=1, description="torch threads in each mapped task on a cluster")
    shards: int | None = Field(None, ge=1, le=1024,
                               description="shards per mapped stage; default: 1 for threads, else `workers`")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("address must be a scheduler address such as tcp://host:8786, or left out")
        return value

    def shard_count(self) -> int:
        """How many shards each mapped stage is split into."""
        if self.shards is not None:
            return self.shards
        return 1 if self.kind == "threads" else self.workers


class LaunchSettings(BaseModel):
    """How the generator's training is launched: in the flow's process, or across processes/GPUs with torchrun
    (DDP; DPDDP when private). The global batch, the steps and the DP accounting are those of a single-process
    run. (Called `training:` before; that name is still read, with a deprecation warning.)"""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nproc: int = Field(1, ge=1, le=64, description="training processes on this machine (one per GPU on CUDA)")
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class ReleaseConfig(BaseModel):
    """Everything one release needs. Paths are relative to where the flow runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    release_id: str | None = Field(None, description="default: <title slug>-<date>-<synthetic hash>")
    title: str = "Synthetic PneumoniaMNIST"
    purpose: str | None = None
    publisher: str | None = None
    contact: str | None = None
    workdir: Path = Path("demo-output/work")
    releases_dir: Path = Path("demo-output/releases")
    private_key: Path = Path("demo-output/keys/release.key")
    passphrase_env: str | None = Field(None, description="environment variable holding the key's passphrase")
    device: str = "auto"
    source: SourceSettings = SourceSettings()
    train: TrainConfig = TrainConfig(preset="small")
    dp: DPSettings = DPSettings()
    public_pretraining: PublicPretrainingSettings | None = None
    dp_audit: DPAuditSettings = DPAuditSettings()
    generate: GenerateSettings = GenerateSettings()
    privacy_audit: dict[str, Any] = Field(default_factory=dict, description="PrivacyAuditConfig fields")
    # The CPU demo measures augmentation at one ratio; add more (e.g. [0.5, 1, 2]) when time allows.
    utility_audit: dict[str, Any] = Field(default_factory=lambda: {"ratios": [1.0]},
                                          description="UtilityConfig fields")
    filter_flagged: bool = Field(True, description="drop synthetic images flagged as too close to a patient")
    policy: Policy = Policy()
    approval: ApprovalSettings = ApprovalSettings()
    runner: RunnerSettings = RunnerSettings()
    launch: LaunchSettings = LaunchSettings()

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _migrate(data) if isinstance(data, dict) else data

    _train = field_validator("train", mode="before")(_small_unless_named)

    @model_validator(mode="after")
    def _public(self) -> ReleaseConfig:
        pre = self.public_pretraining
        if pre is None:
            return self
        if self.train.init_from is not None:
            raise ValueError("give public_pretraining or train.init_from, not both (public_pretraining sets it)")
        if pre.train.preset != self.train.preset:
            raise ValueError(f"public_pretraining.train.preset {pre.train.preset!r} differs from train.preset "
                             f"{self.train.preset!r}: fine-tuning needs the same UNet")
        if pre.train.prediction_type != self.train.prediction_type:
            raise ValueError(f"public_pretraining.train.prediction_type {pre.train.prediction_type!r} differs from "
                             f"train.prediction_type {self.train.prediction_type!r}: set both")
        if pre.train.init_from is not None:
            raise ValueError("public_pretraining.train.init_from must be empty (pretraining starts fresh)")
        return self

    @model_validator(mode="after")
    def _latent_dp_keeps_the_guarantee(self) -> ReleaseConfig:
        # Refused when the config is read, not after the data stage (see synth.generator_kind): a latent DP release
        # needs a DP autoencoder (a share of ε) or a public one (a latent init_from model, or public pretraining,
        # whose kind the trainer checks once that model exists).
        from synth.generator_kind import LATENT_DP_REFUSAL

        public = self.train.init_from is not None or self.public_pretraining is not None
        if self.dp.enabled and self.train.kind == "latent" and self.dp.autoencoder_share == 0 and not public:
            raise ValueError(LATENT_DP_REFUSAL)
        return self

    @field_validator("privacy_audit")
    @classmethod
    def _privacy_audit(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Checked now, not when the stage runs after minutes of training.
        from privacy.audit_config import PrivacyAuditConfig

        PrivacyAuditConfig.model_validate(value)
        return value

    @field_validator("utility_audit")
    @classmethod
    def _utility_audit(cls, value: dict[str, Any]) -> dict[str, Any]:
        from reports.utility import UtilityConfig

        UtilityConfig.model_validate(value)
        return value

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> ReleaseConfig:
        """Load a release file; keyword overrides (from CLI flags) win over the file. One-line errors."""
        data = load_yaml(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return build(cls, data, source=path)


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Old spellings, read with a one-line deprecation warning: `training:` (now `launch:`) and
    `dp.noise_multiplicity` (K is a training setting, so one place holds it: `train.noise_multiplicity`)."""
    data = dict(data)
    if "training" in data:
        if "launch" in data:
            raise ValueError("give `launch:` only (`training:` is its old name)")
        _deprecated("`training:` is now `launch:`; rename the section")
        data["launch"] = data.pop("training")
    dp = data.get("dp")
    if isinstance(dp, dict) and "noise_multiplicity" in dp:
        dp = dict(dp)
        k = dp.pop("noise_multiplicity")
        train = data.get("train")
        had = train.noise_multiplicity if isinstance(train, TrainConfig) else (train or {}).get("noise_multiplicity")
        if had is not None and had != k:
            raise ValueError(f"dp.noise_multiplicity {k!r} differs from train.noise_multiplicity {had!r}; "
                             "set it once, in train:")
        if had is None:
            train = dict(train or {})
            train["noise_multiplicity"] = k
        _deprecated("`dp.noise_multiplicity` is now `train.noise_multiplicity` (it applies with or without DP)")
        data["dp"], data["train"] = dp, train
    return data


def _deprecated(message: str) -> None:
    warnings.warn(f"release config: {message}", FutureWarning, stacklevel=2)
