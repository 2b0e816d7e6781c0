"""Facts of the two datasets a release documents (`reports.facts`): the real source (`SourceFacts`) and the released
synthetic set (`SyntheticFacts`), read off their canonical `dataset.json` headers and metadata, plus the checks and
column types of what the release's metadata.csv may hold."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from reports.facts_base import FactsModel as _Facts
from reports.facts_base import ImageSpec
from reports.facts_base import plain_dict as _plain_dict
from synth.errors import InputError, where

SYNTHETIC_SPLIT = "synthetic"


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
