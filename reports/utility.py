"""The utility audit: does the clinical signal survive synthesis? (TRTR, TRTS, TSTR, augmentation, fidelity.)

Settings, all with one classifier architecture and seed (`reports/classifier.py`) so differences come from data:

- TRTR: train on real train, select on real val, score on real test. The baseline.
- TRTS: the TRTR classifier applied to every synthetic image, scored against the label the image was conditioned
  on: is the finding recognisable in each synthetic image?
- TSTR: train on the synthetic set, select on real val (not the test set, so allowed), score on real test: do
  models trained on synthetic data work on real patients? Reported with the paired ratio TSTR/TRTR.
- Augmentation: train on real train + a random subset of r × |real train| synthetic images for each ratio r,
  select on real val, score on real test (the subsets are nested; when the synthetic set is too small, all of it
  is used, the effective ratio is recorded, and a ratio capped to the same data as an earlier one reuses that
  classifier instead of training an identical one again).
- Fidelity (`reports/fidelity.py`): FID, KID, precision/recall between real train and the synthetic set, overall
  and per class, in the TRTR classifier's penultimate-layer space (plus the copy-detection encoder and a
  user-supplied Inception when given), next to the same numbers for the real holdout (val + test) against real
  train: the floor a perfect generator would reach at that sample size.

The real test split is used for scoring only, never for training or selection. Output: one atomic directory with
`utility.json` (header kind "utility_audit"; all numbers; metrics as `{"value": v, "ci": [lo, hi]}`) and
`roc.json` (ROC points per setting for plots). Timings live in `utility.json` only, so the content hash (over
`roc.json`) stays the same for the same inputs and config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reports.classifier import Classifier, ClassifierConfig, torch_threads, train_classifier
from reports.fidelity import FidelityConfig, fidelity_by_class
from reports.metrics import classification_metrics, paired_auroc_comparison, roc_curve, subgroup_metrics
from synth.artifacts import atomic_dir, sha256_file, write_header, write_json
from synth.data.canonical import SPLITS, Dataset, load_dataset
from synth.errors import InputError, where

KIND = "utility_audit"
SCHEMA_VERSION = 1
HEADER = "utility.json"
ROC = "roc.json"
SYNTHETIC_SPLIT = "synthetic"


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


# --------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    metadata: pd.DataFrame

    @property
    def labels(self) -> np.ndarray:
        return self.metadata["label"].to_numpy(dtype=np.int64)


@dataclass(frozen=True)
class AuditInputs:
    """Both datasets, checked against each other, with their splits in memory."""

    real: Dataset
    synthetic: Dataset
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    synth: Split
    synthetic_split: str  # "synthetic", or "all" when the set has no rows marked synthetic

    @property
    def image(self) -> dict[str, int]:
        return _spec(self.train.images)


def _spec(images: np.ndarray) -> dict[str, int]:
    return {"height": int(images.shape[1]), "width": int(images.shape[2]),
            "channels": 1 if images.ndim == 3 else int(images.shape[3])}


def load_audit_inputs(real_dir: Path, synthetic_dir: Path) -> AuditInputs:
    """Open both datasets and check they can be compared; every problem is one-line `InputError`."""
    real_dir, synthetic_dir = Path(real_dir), Path(synthetic_dir)
    real, syn = load_dataset(real_dir), load_dataset(synthetic_dir)
    names = real.class_names
    if len(names) < 2:
        raise InputError(where(real_dir, f"needs at least two classes to audit utility, has {names}"))
    if syn.class_names != names:
        raise InputError(where(synthetic_dir, f"class names {syn.class_names} differ from the real set's {names}"))

    counts = real.metadata["split"].value_counts()
    missing = [s for s in SPLITS if counts.get(s, 0) == 0]
    if missing:
        found = ", ".join(f"{s}={n}" for s, n in counts.items()) or "no images"
        raise InputError(where(real_dir, f"real set needs train/val/test splits; missing {', '.join(missing)} "
                                         f"(found {found})"))
    splits = {s: Split(*real.split(s)) for s in SPLITS}

    meta = syn.metadata
    marked = (meta["split"] == SYNTHETIC_SPLIT).to_numpy()
    mask = marked if marked.any() else np.ones(len(meta), dtype=bool)
    if not mask.any():
        raise InputError(where(synthetic_dir, "synthetic set is empty (0 images)"))
    synth = Split(np.asarray(syn.images[mask]), meta[mask].reset_index(drop=True))

    spec_r, spec_s = _spec(splits["train"].images), _spec(synth.images)
    if spec_r != spec_s:
        raise InputError(where(synthetic_dir, f"images are {spec_s['height']}×{spec_s['width']}×"
                                              f"{spec_s['channels']} (H×W×C) but the real set's are "
                                              f"{spec_r['height']}×{spec_r['width']}×{spec_r['channels']}"))

    k = len(names)
    for split_name, where_dir, split, need_all in (
        ("train", real_dir, splits["train"], True),
        ("synthetic", synthetic_dir, synth, True),
        ("val", real_dir, splits["val"], False),
        ("test", real_dir, splits["test"], False),
    ):
        labels = split.labels
        bad = labels[(labels < 0) | (labels >= k)]
        if len(bad):
            raise InputError(where(where_dir, f"{split_name} label {int(bad[0])} is outside 0..{k - 1}"))
        absent = [names[c] for c in range(k) if not (labels == c).any()]
        if need_all and absent:
            raise InputError(where(where_dir, f"{split_name} set has no images of class(es) {absent}"))
        if not need_all and k - len(absent) < 2:
            raise InputError(where(where_dir, f"{split_name} split needs images of at least two classes "
                                              f"(missing {absent})"))
    return AuditInputs(real=real, synthetic=syn, class_names=names, train=splits["train"], val=splits["val"],
                       test=splits["test"], synth=synth,
                       synthetic_split=SYNTHETIC_SPLIT if marked.any() else "all")


def _attribute_groups(ds: Dataset, meta: pd.DataFrame) -> dict[str, np.ndarray]:
    attrs = [a for a in ds.header.get("attributes", []) if a in meta.columns]
    return {a: meta[a].to_numpy() for a in attrs}


# --------------------------------------------------------------------------------------------------------------
# The audit


def _roc(y: np.ndarray, proba: np.ndarray, class_names: Sequence[str], max_points: int) -> dict[str, Any]:
    """Binary: the positive class's curve; more classes: one-vs-rest curve per class."""
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    return {class_names[c]: roc_curve(y == c, proba[:, c], max_points=max_points) for c in classes}


def _score(y: np.ndarray, proba: np.ndarray, *, names: Sequence[str], cfg: UtilityConfig, seed: int,
           groups: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out = classification_metrics(y, proba, class_names=names, n_boot=cfg.n_boot, level=cfg.ci_level, seed=seed)
    out["subgroups"] = subgroup_metrics(y, proba, groups, class_names=names, min_size=cfg.min_subgroup,
                                        n_boot=cfg.n_boot, level=cfg.ci_level, seed=seed) if groups else {}
    return out


FeatureFn = Callable[[np.ndarray], np.ndarray]


def _extra_feature_spaces(cfg: UtilityConfig, image: Mapping[str, int]) -> tuple[dict[str, tuple[FeatureFn, str]],
                                                                                 dict[str, str]]:
    """Optional fidelity spaces, loaded (and checked) before any training starts."""
    spaces: dict[str, tuple[FeatureFn, str]] = {}
    inputs: dict[str, str] = {}
    if cfg.encoder is not None:
        from privacy.embeddings import load_encoder

        enc = load_encoder(cfg.encoder)
        if enc.image != dict(image):
            raise InputError(where(cfg.encoder, f"encoder was trained on {enc.image} images, the audit has {image}"))
        spaces["copy_encoder"] = (enc.embed, "privacy copy-detection encoder (L2-normalised embeddings)")
        inputs["encoder"] = str(enc.meta.get("content_hash", ""))
    if cfg.inception_weights is not None:
        from reports.fidelity import inception_features

        spaces["inception"] = (inception_features(cfg.inception_weights),
                               "user-supplied Inception TorchScript (images resized to 299×299)")
        inputs["inception_weights"] = sha256_file(Path(cfg.inception_weights))
    return spaces, inputs


def audit_utility(
    real_dir: Path,
    synthetic_dir: Path,
    out: Path,
    *,
    config: UtilityConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Run the utility audit of `synthetic_dir` against `real_dir` and write it atomically to `out`.

    Returns `out`. Raises `InputError` (before any training) when the sets cannot be compared.
    """
    cfg = config or UtilityConfig()
    out = Path(out)
    say = progress or (lambda _msg: None)
    if out.exists() and not overwrite:
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    if not out.parent.exists():
        raise InputError(where(out.parent, "output's parent directory does not exist"))
    data = load_audit_inputs(real_dir, synthetic_dir)
    extra_spaces, extra_inputs = _extra_feature_spaces(cfg, data.image) if cfg.fidelity else ({}, {})
    names, k = data.class_names, len(data.class_names)
    y_test, y_syn = data.test.labels, data.synth.labels
    test_groups = _attribute_groups(data.real, data.test.metadata)
    syn_groups = _attribute_groups(data.synthetic, data.synth.metadata)
    timings: dict[str, Any] = {}
    roc: dict[str, Any] = {}
    started = time.perf_counter()

    def train(images: np.ndarray, labels: np.ndarray) -> Classifier:
        return train_classifier(images, labels, data.val.images, data.val.labels, config=cfg.classifier,
                                num_classes=k)

    # TRTR
    say(f"TRTR: training on {len(data.train.images)} real images")
    t = time.perf_counter()
    clf_real = train(data.train.images, data.train.labels)
    p_trtr = clf_real.predict_proba(data.test.images)
    trtr = {"train": "real/train", "select": "real/val", "test": "real/test",
            **_score(y_test, p_trtr, names=names, cfg=cfg, seed=cfg.seed, groups=test_groups),
            "classifier": clf_real.summary()}
    roc["trtr"] = _roc(y_test, p_trtr, names, cfg.max_roc_points)
    timings["trtr_s"] = round(time.perf_counter() - t, 2)

    # TRTS
    say(f"TRTS: scoring {len(data.synth.images)} synthetic images with the real-trained classifier")
    t = time.perf_counter()
    p_trts = clf_real.predict_proba(data.synth.images)
    trts = {"classifier": "trtr", "test": f"synthetic ({data.synthetic_split}; labels = conditioning)",
            **_score(y_syn, p_trts, names=names, cfg=cfg, seed=cfg.seed + 1, groups=syn_groups)}
    roc["trts"] = _roc(y_syn, p_trts, names, cfg.max_roc_points)
    timings["trts_s"] = round(time.perf_counter() - t, 2)

    # TSTR
    say(f"TSTR: training on {len(data.synth.images)} synthetic images")
    t = time.perf_counter()
    clf_syn = train(data.synth.images, y_syn)
    p_tstr = clf_syn.predict_proba(data.test.images)
    tstr = {"train": f"synthetic ({data.synthetic_split})", "select": "real/val", "test": "real/test",
            **_score(y_test, p_tstr, names=names, cfg=cfg, seed=cfg.seed + 2, groups=test_groups),
            "classifier": clf_syn.summary()}
    roc["tstr"] = _roc(y_test, p_tstr, names, cfg.max_roc_points)
    cmp = paired_auroc_comparison(y_test, p_trtr, p_tstr, n_boot=cfg.n_boot, level=cfg.ci_level, seed=cfg.seed + 3)
    timings["tstr_s"] = round(time.perf_counter() - t, 2)

    # Augmentation
    n_real, n_syn = len(data.train.images), len(data.synth.images)
    order = np.random.default_rng(cfg.seed).permutation(n_syn)  # nested subsets across ratios
    curve: list[dict[str, Any]] = [{
        "ratio": 0.0, "ratio_effective": 0.0, "n_real": n_real, "n_synthetic": 0,
        **{m: trtr[m] for m in ("auroc", "accuracy", "balanced_accuracy", "f1_macro")},
        "auroc_minus_trtr": {"value": 0.0, "ci": [0.0, 0.0]}, "note": "the TRTR classifier",
    }]
    roc["augmentation"] = {}
    timings["augmentation_s"] = {}
    done: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}  # n_use → (curve point, roc) already trained
    for i, ratio in enumerate(cfg.ratios):
        n_use = min(round(ratio * n_real), n_syn)
        note = {"note": f"synthetic set too small: used all {n_syn} images"} if n_use < round(ratio * n_real) else {}
        if n_use in done:  # a capped ratio trains on exactly the same data as an earlier one: reuse it
            point, point_roc = done[n_use]
            curve.append({**point, "ratio": ratio, **note})
            roc["augmentation"][f"{ratio:g}"] = point_roc
            timings["augmentation_s"][f"{ratio:g}"] = 0.0
            continue
        pick = np.sort(order[:n_use])
        say(f"augmentation {ratio:g}: training on {n_real} real + {n_use} synthetic images")
        t = time.perf_counter()
        clf = train(np.concatenate([data.train.images, data.synth.images[pick]]),
                    np.concatenate([data.train.labels, y_syn[pick]]))
        p = clf.predict_proba(data.test.images)
        scored = classification_metrics(y_test, p, class_names=names, n_boot=cfg.n_boot, level=cfg.ci_level,
                                        seed=cfg.seed + 10 + i)
        diff = paired_auroc_comparison(y_test, p_trtr, p, n_boot=cfg.n_boot, level=cfg.ci_level,
                                       seed=cfg.seed + 10 + i)
        curve.append({
            "ratio": ratio, "ratio_effective": round(n_use / n_real, 6), "n_real": n_real, "n_synthetic": n_use,
            **{m: scored[m] for m in ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "per_class")},
            "auroc_minus_trtr": diff["difference"],
            **note,
            "classifier": clf.summary(),
        })
        roc["augmentation"][f"{ratio:g}"] = _roc(y_test, p, names, cfg.max_roc_points)
        done[n_use] = (curve[-1], roc["augmentation"][f"{ratio:g}"])
        timings["augmentation_s"][f"{ratio:g}"] = round(time.perf_counter() - t, 2)

    # Fidelity
    fidelity: dict[str, Any] | None = None
    if cfg.fidelity:
        say("fidelity: FID, KID, precision/recall")
        t = time.perf_counter()
        holdout = np.concatenate([data.val.images, data.test.images])
        y_holdout = np.concatenate([data.val.labels, y_test])
        spaces: dict[str, tuple[FeatureFn, str]] = {
            "classifier": (clf_real.features, "TRTR classifier, penultimate layer (global average pool)"),
            **extra_spaces,
        }
        fidelity = {"reference": "real/train", "config": cfg.fidelity_config.model_dump(mode="json"), "spaces": {}}
        for name, (fn, description) in spaces.items():
            with torch_threads(cfg.classifier.threads):
                fidelity["spaces"][name] = _fidelity_space(fn, description, data, holdout, y_holdout, cfg)
        timings["fidelity_s"] = round(time.perf_counter() - t, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    import torch

    timings["torch_threads"] = cfg.classifier.threads or torch.get_num_threads()

    body = {
        "class_names": names,
        "data": _describe_data(data),
        "trtr": trtr,
        "trts": trts,
        "tstr": tstr,
        "tstr_over_trtr": {**cmp["ratio"], "metric": "auroc", "bootstrap": cmp["bootstrap"]},
        "tstr_minus_trtr": {**cmp["difference"], "metric": "auroc", "bootstrap": cmp["bootstrap"]},
        "augmentation": {"ratios": list(cfg.ratios), "curve": curve},
        "fidelity": fidelity,
        "plots": {"roc": ROC},
        "timings": timings,
    }
    inputs = {"real": data.real.content_hash, "synthetic": data.synthetic.content_hash, **extra_inputs}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / ROC, roc)
        write_header(tmp, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=[ROC], inputs=inputs,
                     config=cfg.model_dump(mode="json"), body=body)
    return out


def _fidelity_space(fn: FeatureFn, description: str, data: AuditInputs, holdout: np.ndarray, y_holdout: np.ndarray,
                    cfg: UtilityConfig) -> dict[str, Any]:
    """Synthetic vs real train, and the real holdout vs real train (the floor), in one feature space."""
    f_train, f_syn, f_hold = fn(data.train.images), fn(data.synth.images), fn(holdout)
    names = data.class_names
    return {
        "description": description,
        "dim": int(f_train.shape[1]),
        "synthetic": fidelity_by_class(f_train, data.train.labels, f_syn, data.synth.labels, class_names=names,
                                       config=cfg.fidelity_config),
        "real_holdout": fidelity_by_class(f_train, data.train.labels, f_hold, y_holdout, class_names=names,
                                          config=cfg.fidelity_config),
    }


def _describe_data(data: AuditInputs) -> dict[str, Any]:
    def counts(labels: np.ndarray) -> dict[str, int]:
        return {name: int((labels == c).sum()) for c, name in enumerate(data.class_names)}

    return {
        "image": data.image,
        "real": {
            "dir": str(data.real.root), "content_hash": data.real.content_hash,
            **{s: {"n": len(getattr(data, s).images), "per_class": counts(getattr(data, s).labels)} for s in SPLITS},
        },
        "synthetic": {
            "dir": str(data.synthetic.root), "content_hash": data.synthetic.content_hash,
            "split_used": data.synthetic_split, "n": len(data.synth.images), "per_class": counts(data.synth.labels),
        },
    }
