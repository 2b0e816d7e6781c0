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
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reports.classifier import Classifier, ClassifierConfig, SmallResNet, torch_threads, train_classifier
from reports.fidelity import FidelityConfig, fidelity_by_class
from reports.metrics import (
    classification_metrics,
    majority_baseline,
    paired_comparison,
    roc_curve,
    subgroup_metrics,
)
from synth import layout
from synth.artifacts import atomic_dir, read_header, sha256_file, verify_content, write_header, write_json
from synth.data.canonical import SPLITS, Dataset, load_dataset
from synth.errors import InputError, where

KIND = layout.UTILITY_KIND
SCHEMA_VERSION = 1
HEADER = layout.UTILITY_HEADER
ROC = layout.UTILITY_ROC
SYNTHETIC_SPLIT = "synthetic"
JOB_KIND = "utility_job"
JOB_SCHEMA_VERSION = 1
JOB_HEADER = "job.json"
WEIGHTS = "weights.safetensors"
PROBA_TEST = "proba_test.npy"  # (n_test, classes) float64, rows in the real test split's order
PROBA_SYNTHETIC = "proba_synthetic.npy"  # TRTR job only: (n_synthetic, classes) for TRTS
# Torch threads of a classifier job when `classifier.threads` is None (see `_job_threads`).
JOB_THREADS = 1


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
    """Subgroups: the dataset's categorical attributes, never a generator's per-image columns (seed, sampler...)."""
    bookkeeping = set(ds.header.get("generation_columns") or ())
    attrs = [a for a in ds.header.get("attributes", []) if a in meta.columns and a not in bookkeeping]
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
# Classifier jobs: the independent, expensive units (one training each)


@dataclass(frozen=True)
class JobSpec:
    """One classifier training of the audit."""

    name: str  # "trtr", "tstr" or "augmentation-<first ratio>"
    setting: str  # "trtr", "tstr" or "augmentation"
    ratios: tuple[float, ...]  # the augmentation ratios it serves (several when capped to the same data)
    n_synthetic: int  # synthetic images in its training set


def _n_use(ratio: float, n_real: int, n_syn: int) -> int:
    return min(round(ratio * n_real), n_syn)


def _plan(cfg: UtilityConfig, n_real: int, n_syn: int) -> list[JobSpec]:
    """TRTR, TSTR, then one job per distinct augmentation subset size, named after its first (smallest) ratio."""
    jobs = [JobSpec("trtr", "trtr", (), 0), JobSpec("tstr", "tstr", (), n_syn)]
    by_size: dict[int, list[float]] = {}
    for ratio in cfg.ratios:  # sorted ascending by the config
        by_size.setdefault(_n_use(ratio, n_real, n_syn), []).append(ratio)
    jobs += [JobSpec(f"augmentation-{ratios[0]:g}", "augmentation", tuple(ratios), n_use)
             for n_use, ratios in by_size.items()]
    return jobs


def _plan_for(data: AuditInputs, cfg: UtilityConfig) -> list[JobSpec]:
    return _plan(cfg, len(data.train.images), len(data.synth.images))


def plan_classifier_jobs(real_dir: Path, synthetic_dir: Path, *, config: UtilityConfig | None = None) -> list[str]:
    """The names of the audit's classifier jobs, in a stable order: `trtr`, `tstr`, then `augmentation-<ratio>`
    for each distinct augmentation training set (ratios capped to the same synthetic subset share one job, named
    after the smallest). Each can run anywhere with `run_classifier_job`; `audit_utility(jobs=...)` merges them.

    Raises `InputError` when the two sets cannot be compared (the same checks as the audit).
    """
    cfg = config or UtilityConfig()
    return [job.name for job in _plan_for(load_audit_inputs(real_dir, synthetic_dir), cfg)]


def _job_threads(cfg: UtilityConfig) -> int:
    """Torch threads of a job: the configured count, else a fixed one.

    The backward pass's float sums are split by thread count (oneDNN's weight gradients reduce over the batch in
    per-thread partial sums), so the same job trained with 1, 2 or 4 threads gives different weights; inference
    was thread-count invariant in tests. A fixed count makes a job compute the same bytes on every worker.
    With torch's OpenMP backend the count is per calling thread, so concurrent jobs in one process do not change
    each other's.
    """
    return cfg.classifier.threads or JOB_THREADS


def _training_set(data: AuditInputs, cfg: UtilityConfig, job: JobSpec) -> tuple[np.ndarray, np.ndarray, str]:
    if job.setting == "trtr":
        return data.train.images, data.train.labels, "real/train"
    if job.setting == "tstr":
        return data.synth.images, data.synth.labels, f"synthetic ({data.synthetic_split})"
    order = np.random.default_rng(cfg.seed).permutation(len(data.synth.images))  # nested subsets across ratios
    pick = np.sort(order[:job.n_synthetic])
    return (np.concatenate([data.train.images, data.synth.images[pick]]),
            np.concatenate([data.train.labels, data.synth.labels[pick]]),
            f"real/train + {job.n_synthetic} synthetic ({data.synthetic_split}, seeded subset)")


def _run_job(data: AuditInputs, cfg: UtilityConfig, job: JobSpec, out: Path) -> Path:
    """Train one classifier and write its job directory (weights, predicted probabilities, summary)."""
    from safetensors.torch import save_file

    threads = _job_threads(cfg)
    started = time.perf_counter()
    with torch_threads(threads):
        images, labels, train = _training_set(data, cfg, job)
        clf = train_classifier(images, labels, data.val.images, data.val.labels, config=cfg.classifier,
                               num_classes=len(data.class_names))
        t = time.perf_counter()
        proba = {PROBA_TEST: clf.predict_proba(data.test.images)}
        if job.setting == "trtr":  # TRTS: the real-trained classifier on every synthetic image
            proba[PROBA_SYNTHETIC] = clf.predict_proba(data.synth.images)
        predict_s = time.perf_counter() - t
    summary = clf.summary()
    train_s = summary.pop("train_seconds")  # a timing: kept under `timings` so the rest is reproducible
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in clf.model.state_dict().items()}, str(tmp / WEIGHTS))
        for file, array in proba.items():
            np.save(tmp / file, array, allow_pickle=False)
        write_header(
            tmp, JOB_HEADER, kind=JOB_KIND, schema_version=JOB_SCHEMA_VERSION, files=[WEIGHTS, *proba],
            inputs={"real": data.real.content_hash, "synthetic": data.synthetic.content_hash},
            config=cfg.model_dump(mode="json"),
            body={"job": job.name, "setting": job.setting, "ratios": list(job.ratios), "train": train,
                  "n_real": len(data.train.images) if job.setting != "tstr" else 0, "n_synthetic": job.n_synthetic,
                  "image": data.image, "num_classes": len(data.class_names), "torch_threads": threads,
                  "classifier": summary,
                  "timings": {"train_s": round(train_s, 2), "predict_s": round(predict_s, 2),
                              "total_s": round(time.perf_counter() - started, 2)}},
        )
    return out


def _job_spec(plan: Sequence[JobSpec], name: str) -> JobSpec:
    for job in plan:
        if job.name == name:
            return job
    valid = ", ".join(job.name for job in plan)
    raise InputError(where(f"job {name!r}", f"is not a classifier job of this utility audit; valid: {valid}"))


def run_classifier_job(real_dir: Path, synthetic_dir: Path, name: str, out: Path, *,
                       config: UtilityConfig | None = None) -> Path:
    """Train the audit's classifier `name` (one of `plan_classifier_jobs`) and write it atomically to `out`.

    The directory (header `job.json`, kind "utility_job") holds the classifier's weights, its predicted
    probabilities on the real test split (and, for `trtr`, on every synthetic image) and its summary; its inputs
    are both sets' content hashes and its config the whole `UtilityConfig`, which `audit_utility(jobs=...)` checks.
    Deterministic: the same inputs and config give the same files in any process (torch threads pinned, see
    `JOB_THREADS`). Returns `out`. Raises `InputError` for unusable inputs, an unknown name or an existing `out`.
    """
    cfg = config or UtilityConfig()
    out = Path(out)
    data = load_audit_inputs(real_dir, synthetic_dir)
    job = _job_spec(_plan_for(data, cfg), name)
    if out.exists():
        raise InputError(where(out, "already exists; choose another output or remove it"))
    return _run_job(data, cfg, job, out)


def _first_difference(ours: Any, theirs: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted key, our value, their value) where two JSON configs differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in sorted(set(ours) | set(theirs)):
            diff = _first_difference(ours.get(k), theirs.get(k), f"{key}.{k}" if key else k)
            if diff:
                return diff
        return None
    return None if ours == theirs else (key or "config", ours, theirs)


def _check_jobs(data: AuditInputs, cfg: UtilityConfig, plan: Sequence[JobSpec],
                jobs: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """The job headers, after checking the jobs are exactly this audit's: names, inputs, config, contents."""
    names = [job.name for job in plan]
    extra = [name for name in jobs if name not in names]
    if extra:
        raise InputError(where(jobs[extra[0]], f"is given as classifier job {extra[0]!r}, which this audit does not "
                                               f"have (its jobs: {', '.join(names)})"))
    missing = [name for name in names if name not in jobs]
    if missing:
        raise InputError(where("jobs", f"classifier job(s) {', '.join(missing)} missing; this audit needs exactly "
                                       f"{', '.join(names)}"))
    ours = {"real": (data.real.content_hash, data.real.root), "synthetic": (data.synthetic.content_hash,
                                                                            data.synthetic.root)}
    config = cfg.model_dump(mode="json")
    headers: dict[str, dict[str, Any]] = {}
    for name in names:
        root = Path(jobs[name])
        header = read_header(root, JOB_HEADER, kind=JOB_KIND)
        if header["schema_version"] != JOB_SCHEMA_VERSION:
            raise InputError(where(root, f"job schema version {header['schema_version']} is not supported "
                                         f"(expected {JOB_SCHEMA_VERSION})"))
        if header.get("job") != name:
            raise InputError(where(root, f"holds classifier job {header.get('job')!r}, given as {name!r}"))
        for which, (digest, source) in ours.items():
            theirs = str(header["inputs"].get(which))
            if theirs != digest:
                raise InputError(where(root, f"was trained for another {which} set (content hash {theirs[:12]}…, "
                                             f"{source} has {digest[:12]}…)"))
        diff = _first_difference(config, header["config"])
        if diff:
            raise InputError(where(root, f"was trained with another config: {diff[0]} = {diff[2]!r}, this audit's "
                                         f"is {diff[1]!r}"))
        verify_content(root, header)
        headers[name] = header
    return headers


def _load_classifier(root: Path, header: Mapping[str, Any], cfg: UtilityConfig) -> Classifier:
    """The job's trained classifier, rebuilt from its weights (for feature spaces computed at merge time)."""
    from safetensors.torch import load_file

    image = header["image"]
    model = SmallResNet(image["channels"], header["num_classes"], width=cfg.classifier.width,
                        blocks_per_stage=cfg.classifier.blocks_per_stage,
                        image_size=min(image["height"], image["width"]))
    model.load_state_dict(load_file(str(root / WEIGHTS)))
    model.eval()
    s = header["classifier"]
    return Classifier(model=model, config=cfg.classifier, num_classes=header["num_classes"],
                      image_shape=(image["height"], image["width"], image["channels"]), best_epoch=s["best_epoch"],
                      val_auroc=s["val_auroc"], history=s["history"], n_train=s["n_train"],
                      train_class_counts=s["train_class_counts"])


def _announce(job: JobSpec, data: AuditInputs) -> str:
    n_real, n_syn = len(data.train.images), len(data.synth.images)
    if job.setting == "trtr":
        return f"TRTR: training on {n_real} real images"
    if job.setting == "tstr":
        return f"TSTR: training on {n_syn} synthetic images"
    return f"augmentation {job.ratios[0]:g}: training on {n_real} real + {job.n_synthetic} synthetic images"


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
    plan = _plan_for(data, cfg)
    if jobs is not None:
        headers = _check_jobs(data, cfg, plan, jobs)
        say(f"merging {len(plan)} classifier jobs")
        return _merge(data, cfg, plan, {name: Path(jobs[name]) for name in headers}, headers, extra_spaces,
                      extra_inputs, out, overwrite=overwrite, say=say, started=started)
    with tempfile.TemporaryDirectory(prefix="synthgate-utility-jobs-") as tmp:
        dirs: dict[str, Path] = {}
        for job in plan:
            say(_announce(job, data))
            dirs[job.name] = _run_job(data, cfg, job, Path(tmp) / job.name)
        headers = _check_jobs(data, cfg, plan, dirs)
        return _merge(data, cfg, plan, dirs, headers, extra_spaces, extra_inputs, out, overwrite=overwrite, say=say,
                      started=started)


def _merge(data: AuditInputs, cfg: UtilityConfig, plan: Sequence[JobSpec], dirs: Mapping[str, Path],
           headers: Mapping[str, Mapping[str, Any]], extra_spaces: Mapping[str, tuple[FeatureFn, str]],
           extra_inputs: Mapping[str, str], out: Path, *, overwrite: bool, say: Callable[[str], None],
           started: float) -> Path:
    """Score every job's predictions, compute fidelity in the TRTR classifier's space and write the audit."""
    names, n_real, n_syn = data.class_names, len(data.train.images), len(data.synth.images)
    y_test, y_syn = data.test.labels, data.synth.labels
    test_groups = _attribute_groups(data.real, data.test.metadata)
    syn_groups = _attribute_groups(data.synthetic, data.synth.metadata)
    job_s = {name: float(headers[name]["timings"]["total_s"]) for name in dirs}
    timings: dict[str, Any] = {"jobs_s": job_s,
                               "classifier_train_s": {name: headers[name]["timings"]["train_s"] for name in dirs}}
    roc: dict[str, Any] = {}

    def proba(name: str, file: str = PROBA_TEST) -> np.ndarray:
        return np.load(dirs[name] / file, allow_pickle=False)

    def classifier(name: str) -> dict[str, Any]:
        return headers[name]["classifier"]

    # TRTR
    t = time.perf_counter()
    p_trtr = proba("trtr")
    trtr = {"train": "real/train", "select": "real/val", "test": "real/test",
            **_score(y_test, p_trtr, names=names, cfg=cfg, seed=cfg.seed, groups=test_groups),
            "classifier": classifier("trtr")}
    roc["trtr"] = _roc(y_test, p_trtr, names, cfg.max_roc_points)
    timings["trtr_s"] = round(job_s["trtr"] + time.perf_counter() - t, 2)

    # TRTS
    say(f"TRTS: scoring {n_syn} synthetic images with the real-trained classifier")
    t = time.perf_counter()
    p_trts = proba("trtr", PROBA_SYNTHETIC)
    trts = {"classifier": "trtr", "test": f"synthetic ({data.synthetic_split}; labels = conditioning)",
            **_score(y_syn, p_trts, names=names, cfg=cfg, seed=cfg.seed + 1, groups=syn_groups)}
    roc["trts"] = _roc(y_syn, p_trts, names, cfg.max_roc_points)
    timings["trts_s"] = round(time.perf_counter() - t, 2)

    # TSTR
    t = time.perf_counter()
    p_tstr = proba("tstr")
    tstr = {"train": headers["tstr"]["train"], "select": "real/val", "test": "real/test",
            **_score(y_test, p_tstr, names=names, cfg=cfg, seed=cfg.seed + 2, groups=test_groups),
            "classifier": classifier("tstr")}
    roc["tstr"] = _roc(y_test, p_tstr, names, cfg.max_roc_points)
    cmp = paired_comparison(y_test, p_trtr, p_tstr, n_boot=cfg.n_boot, level=cfg.ci_level, seed=cfg.seed + 3)
    timings["tstr_s"] = round(job_s["tstr"] + time.perf_counter() - t, 2)

    # Augmentation
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
        n_use = _n_use(ratio, n_real, n_syn)
        name = job_of[n_use]
        note = {"note": f"synthetic set too small: used all {n_syn} images"} if n_use < round(ratio * n_real) else {}
        if name in done:  # a capped ratio trained on exactly the same data as an earlier one: the same classifier
            point, point_roc = done[name]
            curve.append({**point, "ratio": ratio, **note})
            roc["augmentation"][f"{ratio:g}"] = point_roc
            timings["augmentation_s"][f"{ratio:g}"] = 0.0
            continue
        say(f"augmentation {ratio:g}: scoring")
        t = time.perf_counter()
        p = proba(name)
        scored = classification_metrics(y_test, p, class_names=names, n_boot=cfg.n_boot, level=cfg.ci_level,
                                        seed=cfg.seed + 10 + i)
        diff = paired_comparison(y_test, p_trtr, p, metrics=_GAIN_METRICS, n_boot=cfg.n_boot, level=cfg.ci_level,
                                 seed=cfg.seed + 10 + i)
        curve.append({
            "ratio": ratio, "ratio_effective": round(n_use / n_real, 6), "n_real": n_real, "n_synthetic": n_use,
            **{m: scored[m] for m in (*_CURVE_METRICS, "per_class")},
            **{f"{m}_minus_trtr": diff[m]["difference"] for m in _GAIN_METRICS},
            **note,
            "classifier": classifier(name),
        })
        roc["augmentation"][f"{ratio:g}"] = _roc(y_test, p, names, cfg.max_roc_points)
        done[name] = (curve[-1], roc["augmentation"][f"{ratio:g}"])
        timings["augmentation_s"][f"{ratio:g}"] = round(job_s[name] + time.perf_counter() - t, 2)

    # Fidelity
    threads = _job_threads(cfg)
    fidelity: dict[str, Any] | None = None
    if cfg.fidelity:
        say("fidelity: FID, KID, precision/recall")
        t = time.perf_counter()
        clf_real = _load_classifier(dirs["trtr"], headers["trtr"], cfg)
        holdout = np.concatenate([data.val.images, data.test.images])
        y_holdout = np.concatenate([data.val.labels, y_test])
        spaces: dict[str, tuple[FeatureFn, str]] = {
            "classifier": (clf_real.features, "TRTR classifier, penultimate layer (global average pool)"),
            **extra_spaces,
        }
        fidelity = {"reference": "real/train", "config": cfg.fidelity_config.model_dump(mode="json"), "spaces": {}}
        for name, (fn, description) in spaces.items():
            with torch_threads(threads):  # the jobs' thread count: features are reproducible too
                fidelity["spaces"][name] = _fidelity_space(fn, description, data, holdout, y_holdout, cfg)
        timings["fidelity_s"] = round(time.perf_counter() - t, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    timings["torch_threads"] = threads

    body = {
        "class_names": names,
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
        "classifier_jobs": {name: headers[name]["content_hash"] for name in dirs},
        "plots": {"roc": ROC},
        "timings": timings,
    }
    inputs = {"real": data.real.content_hash, "synthetic": data.synthetic.content_hash, **extra_inputs}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / ROC, roc)
        write_header(tmp, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=[ROC], inputs=inputs,
                     config=cfg.model_dump(mode="json"), body=body)
    return out


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
