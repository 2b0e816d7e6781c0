"""Test helpers for the release documents: demo ReleaseFacts and small synthetic canonical datasets.

Only for tests: the package never fabricates facts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports.facts import (
    ApprovalFacts,
    DuplicateSummary,
    Estimate,
    GateFacts,
    ImageSpec,
    ModelFacts,
    PrivacyAuditFacts,
    PrivacyFacts,
    ReleaseFacts,
    SourceFacts,
    SyntheticFacts,
    UtilityAuditFacts,
)
from synth.data.canonical import write_dataset

CLASS_NAMES = ("normal", "pneumonia")
LEDGER = {
    "events": [{"type": "DPSGDEvent", "noise_multiplier": 1.1, "sample_rate": 0.0136, "steps": 1500}],
    "delta": 1e-5,
    "accountant": "prv",
    "epsilon": 7.93,
    "target_epsilon": 8.0,
    "max_grad_norm": 1.0,
    "noise_multiplicity": 4,
    "dataset_size": 4690,
    "batch_size": 64,
    "secure_rng": False,
    "secure_rng_reason": "torchcsprng unavailable for current torch (Opacus secure_mode needs it)",
    "privacy_unit": "training example (one image)",
    "epsilon_check": {"library": "dp-accounting 0.6.0", "method": "pld", "epsilon": 7.95},
    "steps": 1500,
}


def make_synthetic(
    out: Path,
    *,
    per_class: int = 4,
    size: int = 28,
    seed: int = 0,
    images: np.ndarray | None = None,
    class_names: tuple[str, ...] = CLASS_NAMES,
    extra_columns: bool = True,
) -> Path:
    """A canonical 'generated set': random-noise images (or `images`), all rows split 'synthetic'."""
    n = per_class * len(class_names) if images is None else len(images)
    rng = np.random.default_rng(seed)
    if images is None:
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = np.arange(n) % len(class_names)
    meta = pd.DataFrame({"image_id": [f"gen-{i:05d}" for i in range(n)], "split": "synthetic", "label": labels})
    if extra_columns:
        meta["seed"] = 1000 + np.arange(n)
        meta["sex"] = np.where(np.arange(n) % 3 == 0, "F", "M")
    return write_dataset(
        out,
        images,
        meta,
        class_names=list(class_names),
        source={"format": "synthetic", "model": "m" * 64},
        license="CC BY 4.0",
        attribution="demo",
        # As synth.generate writes it: the run config (sampler label, seed, ...) and the condition space.
        config={"sampler": {"name": "ddim", "steps": 25, "guidance_scale": 1.5}, "sampler_label": "ddim-25",
                "seed": seed, "unet_batch_size": 64},
        extra={"generation": {"model": "/private/path/model", "conditions": {"class_names": list(class_names),
                                                                             "attributes": []}}},
    )


def demo_facts(synthetic: SyntheticFacts | None = None, **overrides: Any) -> ReleaseFacts:
    """A complete, DP, auto-approved ReleaseFacts; override any top-level field."""
    names = synthetic.class_names if synthetic is not None else CLASS_NAMES
    source = SourceFacts(
        name="pneumoniamnist",
        format="medmnist",
        file="pneumoniamnist.npz",
        file_sha256="a" * 64,
        content_hash="b" * 64,
        license="CC BY 4.0",
        attribution="MedMNIST v2 (Yang et al., Scientific Data 2023); Kermany et al., Cell 2018",
        original_source="Kermany et al., Cell 2018 (pediatric chest X-rays)",
        class_names=names,
        counts={"train": 4690, "val": 516, "test": 621, "total": 5827},
        counts_per_class={
            s: {n: c // len(names) for n in names} for s, c in (("train", 4690), ("val", 516), ("test", 621))
        },
        image=ImageSpec(height=28, width=28, channels=1),
        duplicates=DuplicateSummary(policy="collapse", groups=27, within_split=19, across_splits=8, removed=30),
    )
    if synthetic is None:
        synthetic = SyntheticFacts(
            content_hash="c" * 64,
            class_names=names,
            counts_per_class={n: 4 for n in names},
            image=ImageSpec(height=28, width=28, channels=1),
            sampler="ddim-25",
            seed_min=1000,
            seed_max=1007,
            columns={"image_id": "string", "seed": "int64", "sex": "string"},
            generation={"guidance_scale": 1.5},
        )
    fields: dict[str, Any] = {
        "release_id": "rel-demo-001",
        "title": "Synthetic PneumoniaMNIST (demo)",
        "created": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        "synthgate_version": "0.1.0",
        "git_commit": "d" * 40,
        "publisher": "Demo Hospital Data Office",
        "contact": "data-office@example.org",
        "source": source,
        "model": ModelFacts(
            content_hash="e" * 64,
            preset="tiny-28",
            weights="ema",
            training={"steps": 1500, "batch_size": 64, "lr": 2e-4, "final_loss": 0.031},
            num_conditions=2,
            guidance_scale=1.5,
        ),
        "privacy": PrivacyFacts.from_ledger(LEDGER),
        "privacy_audit": PrivacyAuditFacts(
            flagged_fraction_before=0.012,
            flagged_fraction_after=0.0,
            removed=3,
            thresholds={"nn_distance": 0.05},
            membership_auc=0.52,
            disclosure_k=5,
        ),
        "utility_audit": UtilityAuditFacts(
            balanced_accuracy={"TRTR": Estimate(value=0.89, ci_low=0.86, ci_high=0.91, ci_level=0.95),
                               "TSTR": Estimate(value=0.84, ci_low=0.81, ci_high=0.87, ci_level=0.95)},
            worst_class_sensitivity={"TRTR": Estimate(value=0.81), "TSTR": Estimate(value=0.74)},
            worst_class={"TRTR": "normal", "TSTR": "normal"},
            ratios={"balanced_accuracy": Estimate(value=0.944), "worst_class_sensitivity": Estimate(value=0.914)},
            majority_baseline={"class": "pneumonia", "accuracy": 0.625, "balanced_accuracy": 0.5},
            auroc={
                "TRTR": Estimate(value=0.95, ci_low=0.93, ci_high=0.97, ci_level=0.95),
                "TSTR": Estimate(value=0.88, ci_low=0.85, ci_high=0.91, ci_level=0.95),
                "TRTS": Estimate(value=0.90),
            },
            accuracy={"TRTR": Estimate(value=0.9), "TSTR": Estimate(value=0.82)},
            classifier="small CNN",
        ),
        "gate": GateFacts(verdict="pass", reasons=("epsilon 7.93 <= 8.0", "no flagged images"), policy={"max_eps": 8}),
        "approval": ApprovalFacts(
            decision="approved", auto_approved=True, comment="", time=datetime(2025, 1, 2, 4, 0, tzinfo=UTC)
        ),
        "synthetic": synthetic,
    }
    fields.update(overrides)
    return ReleaseFacts(**fields)


def build_bundle(
    tmp: Path, *, report_dir: Path | None = None, facts_overrides: dict[str, Any] | None = None, **synthetic: Any
) -> tuple[Path, Path, ReleaseFacts]:
    """Make a synthetic set under `tmp` and write a bundle's content for it; returns (bundle, synthetic, facts)."""
    from flows.bundle import write_bundle_content

    syn = make_synthetic(tmp / "synthetic", **synthetic)
    facts = demo_facts(SyntheticFacts.from_dataset(syn), **(facts_overrides or {}))
    bundle = tmp / "bundle"
    bundle.mkdir()
    write_bundle_content(bundle, synthetic_dir=syn, public_report_dir=report_dir, facts=facts)
    return bundle, syn, facts
