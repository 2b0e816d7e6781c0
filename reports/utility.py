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
`roc.json` (ROC points per setting for plots). Timings live in `utility.json`'s `timings` field only, so the
content hash (over `roc.json`) and the rest of the body stay the same for the same inputs and config.

Scale-out: the classifier trainings are the expensive, independent units. `plan_classifier_jobs` names them
(`trtr`, `tstr`, `augmentation-<ratio>`), `run_classifier_job` trains one and writes a self-contained job
directory (weights, predicted probabilities, summary; kind "utility_job") on any worker, and
`audit_utility(jobs=...)` checks and merges them. Without `jobs` the audit runs the same job code in-process into
a temporary directory and merges the same way, so both give the same audit. Jobs pin torch's thread count
(`JOB_THREADS` unless `classifier.threads` is set): training results depend on it.

Modules: `utility_config` (settings), `utility_inputs` (both datasets, checked), `utility_jobs` (planning, running
and checking the classifier jobs); this module scores the jobs' predictions and writes the audit.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reports.classifier import torch_threads
from reports.fidelity import fidelity_by_class
from reports.metrics import (
    classification_metrics,
    majority_baseline,
    paired_comparison,
    roc_curve,
    subgroup_metrics,
)
from reports.utility_config import UtilityConfig, parse_ratios
from reports.utility_inputs import SYNTHETIC_SPLIT, AuditInputs, attribute_groups, load_audit_inputs
from reports.utility_jobs import (
    JOB_HEADER,
    JOB_KIND,
    JOB_SCHEMA_VERSION,
    JOB_THREADS,
    PROBA_SYNTHETIC,
    PROBA_TEST,
    WEIGHTS,
    ClassifierJob,
    JobSpec,
    announce,
    check_jobs,
    job_threads,
    load_job_classifier,
    n_use,
    plan_classifier_jobs,
    plan_jobs,
    run_classifier_job,
)
from reports.utility_jobs import run_job as _run_job  # a module attribute: tests count the trainings through it
from synth import layout
from synth.artifacts import atomic_dir, sha256_file, write_header, write_json
from synth.data.canonical import SPLITS
from synth.errors import InputError, where

# The audit's public names, wherever they are defined (callers import them from here).
__all__ = [
    "HEADER", "JOB_HEADER", "JOB_KIND", "JOB_SCHEMA_VERSION", "JOB_THREADS", "KIND", "PROBA_SYNTHETIC", "PROBA_TEST",
    "ROC", "SCHEMA_VERSION", "SYNTHETIC_SPLIT", "WEIGHTS", "AuditInputs", "UtilityConfig", "audit_utility",
    "load_audit_inputs", "parse_ratios", "plan_classifier_jobs", "run_classifier_job",
]

KIND = layout.UTILITY_KIND
SCHEMA_VERSION = 1
HEADER = layout.UTILITY_HEADER
ROC = layout.UTILITY_ROC


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
# Metrics of the augmentation curve, and those compared against TRTR (paired) at each point and for TSTR.
_CURVE_METRICS = ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "worst_class_sensitivity")
_GAIN_METRICS = ("auroc", "balanced_accuracy", "worst_class_sensitivity")
_PAIRED = ("balanced_accuracy", "worst_class_sensitivity", "f1_macro", "accuracy", "auroc")


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


# --------------------------------------------------------------------------------------------------------------
# The audit: the jobs' merge


def audit_utility(
    real_dir: Path,
    synthetic_dir: Path,
    out: Path,
    *,
    config: UtilityConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    jobs: Mapping[str, Path] | None = None,
) -> Path:
    """Run the utility audit of `synthetic_dir` against `real_dir` and write it atomically to `out`.

    Without `jobs`, trains every classifier here (through `run_classifier_job`'s code, into a temporary
    directory) and merges them. With `jobs` (name → directory written by `run_classifier_job`, exactly the names
    of `plan_classifier_jobs`), checks they were made from these inputs with this config and merges them without
    training. Both give the same `utility.json` body and `roc.json`, except the `timings` field.

    Returns `out`. Raises `InputError` (before any training) when the sets cannot be compared or a job does not
    belong to this audit, `IntegrityError` when a job's files no longer match its header.
    """
    cfg = config or UtilityConfig()
    out = Path(out)
    say = progress or (lambda _msg: None)
    if out.exists() and not overwrite:
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    if not out.parent.exists():
        raise InputError(where(out.parent, "output's parent directory does not exist"))
    started = time.perf_counter()
    data = load_audit_inputs(real_dir, synthetic_dir)
    extra_spaces, extra_inputs = _extra_feature_spaces(cfg, data.image) if cfg.fidelity else ({}, {})
    plan = plan_jobs(data, cfg)
    if jobs is not None:
        headers = check_jobs(data, cfg, plan, jobs)
        say(f"merging {len(plan)} classifier jobs")
        return _merge(data, cfg, plan, _Jobs({name: Path(jobs[name]) for name in headers}, headers), extra_spaces,
                      extra_inputs, out, overwrite=overwrite, say=say, started=started)
    with tempfile.TemporaryDirectory(prefix="synthgate-utility-jobs-") as tmp:
        dirs: dict[str, Path] = {}
        for job in plan:
            say(announce(job, data))
            dirs[job.name] = _run_job(data, cfg, job, Path(tmp) / job.name)
        headers = check_jobs(data, cfg, plan, dirs)
        return _merge(data, cfg, plan, _Jobs(dirs, headers), extra_spaces, extra_inputs, out, overwrite=overwrite,
                      say=say, started=started)


@dataclass(frozen=True)
class _Jobs:
    """The checked classifier jobs the merge reads: directory and header of each, by name."""

    dirs: Mapping[str, Path]
    headers: Mapping[str, ClassifierJob]

    def proba(self, name: str, file: str = PROBA_TEST) -> np.ndarray:
        return np.load(self.dirs[name] / file, allow_pickle=False)

    def classifier(self, name: str) -> dict[str, Any]:
        return self.headers[name].classifier

    def seconds(self, name: str) -> float:
        return float(self.headers[name].timings["total_s"])


def _merge(data: AuditInputs, cfg: UtilityConfig, plan: Sequence[JobSpec], jobs: _Jobs,
           extra_spaces: Mapping[str, tuple[FeatureFn, str]], extra_inputs: Mapping[str, str], out: Path, *,
           overwrite: bool, say: Callable[[str], None], started: float) -> Path:
    """Score every job's predictions, compute fidelity in the TRTR classifier's space and write the audit."""
    timings: dict[str, Any] = {"jobs_s": {name: jobs.seconds(name) for name in jobs.dirs},
                               "classifier_train_s": {name: jobs.headers[name].timings["train_s"]
                                                      for name in jobs.dirs}}
    roc: dict[str, Any] = {}
    trtr, trts, tstr, cmp = _protocols(data, cfg, jobs, roc, timings, say)
    curve = _augmentation_curve(data, cfg, plan, jobs, trtr, roc, timings, say)
    threads = job_threads(cfg)
    fidelity = _fidelity(data, cfg, jobs, extra_spaces, timings, say) if cfg.fidelity else None
    timings["total_s"] = round(time.perf_counter() - started, 2)
    timings["torch_threads"] = threads

    body = {
        "class_names": data.class_names,
        "data": _describe_data(data),
        "trtr": trtr,
        "trts": trts,
        "tstr": tstr,
        # The headline: does a classifier trained on the release work on real patients, class by class?
        "tstr_vs_trtr": {m: cmp[m] for m in _PAIRED} | {"bootstrap": cmp["bootstrap"]},
        "baselines": _baselines(data),
        # AUROC ratio and difference, kept under their original names (AUROC ranks; it can hide a dead class).
        "tstr_over_trtr": {**cmp["auroc"]["ratio"], "metric": "auroc", "bootstrap": cmp["bootstrap"]},
        "tstr_minus_trtr": {**cmp["auroc"]["difference"], "metric": "auroc", "bootstrap": cmp["bootstrap"]},
        "augmentation": {"ratios": list(cfg.ratios), "curve": curve},
        "fidelity": fidelity,
        "classifier_jobs": {name: jobs.headers[name].content_hash for name in jobs.dirs},
        "plots": {"roc": ROC},
        "timings": timings,
    }
    inputs = {"real": data.real.content_hash, "synthetic": data.synthetic.content_hash, **extra_inputs}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / ROC, roc)
        write_header(tmp, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=[ROC], inputs=inputs,
                     config=cfg.model_dump(mode="json"), body=body)
    return out


def _protocols(data: AuditInputs, cfg: UtilityConfig, jobs: _Jobs, roc: dict[str, Any], timings: dict[str, Any],
               say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """TRTR, TRTS and TSTR scored (with their ROC curves and timings), and the paired TSTR-vs-TRTR comparison."""
    names, n_syn = data.class_names, len(data.synth.images)
    y_test, y_syn = data.test.labels, data.synth.labels
    test_groups = attribute_groups(data.real, data.test.metadata)
    syn_groups = attribute_groups(data.synthetic, data.synth.metadata)

    t = time.perf_counter()
    p_trtr = jobs.proba("trtr")
    trtr = {"train": "real/train", "select": "real/val", "test": "real/test",
            **_score(y_test, p_trtr, names=names, cfg=cfg, seed=cfg.seed, groups=test_groups),
            "classifier": jobs.classifier("trtr")}
    roc["trtr"] = _roc(y_test, p_trtr, names, cfg.max_roc_points)
    timings["trtr_s"] = round(jobs.seconds("trtr") + time.perf_counter() - t, 2)

    say(f"TRTS: scoring {n_syn} synthetic images with the real-trained classifier")
    t = time.perf_counter()
    p_trts = jobs.proba("trtr", PROBA_SYNTHETIC)
    trts = {"classifier": "trtr", "test": f"synthetic ({data.synthetic_split}; labels = conditioning)",
            **_score(y_syn, p_trts, names=names, cfg=cfg, seed=cfg.seed + 1, groups=syn_groups)}
    roc["trts"] = _roc(y_syn, p_trts, names, cfg.max_roc_points)
    timings["trts_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    p_tstr = jobs.proba("tstr")
    tstr = {"train": jobs.headers["tstr"].train, "select": "real/val", "test": "real/test",
            **_score(y_test, p_tstr, names=names, cfg=cfg, seed=cfg.seed + 2, groups=test_groups),
            "classifier": jobs.classifier("tstr")}
    roc["tstr"] = _roc(y_test, p_tstr, names, cfg.max_roc_points)
    cmp = paired_comparison(y_test, p_trtr, p_tstr, n_boot=cfg.n_boot, level=cfg.ci_level, seed=cfg.seed + 3)
    timings["tstr_s"] = round(jobs.seconds("tstr") + time.perf_counter() - t, 2)
    return trtr, trts, tstr, cmp


def _augmentation_curve(data: AuditInputs, cfg: UtilityConfig, plan: Sequence[JobSpec], jobs: _Jobs,
                        trtr: Mapping[str, Any], roc: dict[str, Any], timings: dict[str, Any],
                        say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One point per augmentation ratio (the TRTR classifier at ratio 0), each paired against TRTR."""
    names, n_real, n_syn = data.class_names, len(data.train.images), len(data.synth.images)
    y_test, p_trtr = data.test.labels, jobs.proba("trtr")
    curve: list[dict[str, Any]] = [{
        "ratio": 0.0, "ratio_effective": 0.0, "n_real": n_real, "n_synthetic": 0,
        **{m: trtr[m] for m in _CURVE_METRICS},
        "auroc_minus_trtr": {"value": 0.0, "ci": [0.0, 0.0]},
        "balanced_accuracy_minus_trtr": {"value": 0.0, "ci": [0.0, 0.0]},
        "worst_class_sensitivity_minus_trtr": {"value": 0.0, "ci": [0.0, 0.0]},
        "note": "the TRTR classifier",
    }]
    roc["augmentation"] = {}
    timings["augmentation_s"] = {}
    job_of = {job.n_synthetic: job.name for job in plan if job.setting == "augmentation"}
    done: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # job → (curve point, roc) already scored
    for i, ratio in enumerate(cfg.ratios):
        used = n_use(ratio, n_real, n_syn)
        name = job_of[used]
        note = {"note": f"synthetic set too small: used all {n_syn} images"} if used < round(ratio * n_real) else {}
        if name in done:  # a capped ratio trained on exactly the same data as an earlier one: the same classifier
            point, point_roc = done[name]
            curve.append({**point, "ratio": ratio, **note})
            roc["augmentation"][f"{ratio:g}"] = point_roc
            timings["augmentation_s"][f"{ratio:g}"] = 0.0
            continue
        say(f"augmentation {ratio:g}: scoring")
        t = time.perf_counter()
        p = jobs.proba(name)
        scored = classification_metrics(y_test, p, class_names=names, n_boot=cfg.n_boot, level=cfg.ci_level,
                                        seed=cfg.seed + 10 + i)
        diff = paired_comparison(y_test, p_trtr, p, metrics=_GAIN_METRICS, n_boot=cfg.n_boot, level=cfg.ci_level,
                                 seed=cfg.seed + 10 + i)
        curve.append({
            "ratio": ratio, "ratio_effective": round(used / n_real, 6), "n_real": n_real, "n_synthetic": used,
            **{m: scored[m] for m in (*_CURVE_METRICS, "per_class")},
            **{f"{m}_minus_trtr": diff[m]["difference"] for m in _GAIN_METRICS},
            **note,
            "classifier": jobs.classifier(name),
        })
        roc["augmentation"][f"{ratio:g}"] = _roc(y_test, p, names, cfg.max_roc_points)
        done[name] = (curve[-1], roc["augmentation"][f"{ratio:g}"])
        timings["augmentation_s"][f"{ratio:g}"] = round(jobs.seconds(name) + time.perf_counter() - t, 2)
    return curve


def _fidelity(data: AuditInputs, cfg: UtilityConfig, jobs: _Jobs, extra_spaces: Mapping[str, tuple[FeatureFn, str]],
              timings: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """FID, KID, precision/recall in the TRTR classifier's feature space and each extra space."""
    say("fidelity: FID, KID, precision/recall")
    t = time.perf_counter()
    clf_real = load_job_classifier(jobs.dirs["trtr"], jobs.headers["trtr"], cfg)
    holdout = np.concatenate([data.val.images, data.test.images])
    y_holdout = np.concatenate([data.val.labels, data.test.labels])
    spaces: dict[str, tuple[FeatureFn, str]] = {
        "classifier": (clf_real.features, "TRTR classifier, penultimate layer (global average pool)"),
        **extra_spaces,
    }
    fidelity: dict[str, Any] = {"reference": "real/train", "config": cfg.fidelity_config.model_dump(mode="json"),
                                "spaces": {}}
    for name, (fn, description) in spaces.items():
        with torch_threads(job_threads(cfg)):  # the jobs' thread count: features are reproducible too
            fidelity["spaces"][name] = _fidelity_space(fn, description, data, holdout, y_holdout, cfg)
    timings["fidelity_s"] = round(time.perf_counter() - t, 2)
    return fidelity


def _baselines(data: AuditInputs) -> dict[str, Any]:
    """What a classifier that always predicts the real training set's majority class scores: on the real test
    split (the floor for TRTR/TSTR) and on the synthetic set (the floor for TRTS)."""
    majority = int(np.bincount(data.train.labels, minlength=len(data.class_names)).argmax())
    names = data.class_names
    return {
        "majority_class": {
            "real_test": majority_baseline(data.test.labels, majority, class_names=names),
            "synthetic": majority_baseline(data.synth.labels, majority, class_names=names),
            "note": "always predicts the real training set's most frequent class",
        },
        "chance_balanced_accuracy": round(1.0 / len(names), 6),
    }


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
