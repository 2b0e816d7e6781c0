"""The utility audit's classifier jobs (`reports.utility`): the independent, expensive units, one training each.

`plan_classifier_jobs` names them (`trtr`, `tstr`, `augmentation-<ratio>`), `run_classifier_job` trains one into a
self-contained job directory (weights, predicted probabilities, header `job.json` of kind "utility_job", read
through `ClassifierJob`), and `check_jobs` checks a set of them belongs to one audit before the merge.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from reports.classifier import Classifier, SmallResNet, torch_threads, train_classifier
from reports.utility_config import UtilityConfig
from reports.utility_inputs import AuditInputs, load_audit_inputs
from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.errors import InputError, where
from synth.header_schema import HeaderModel, parse_header

JOB_KIND = "utility_job"
JOB_SCHEMA_VERSION = 1
JOB_HEADER = "job.json"
WEIGHTS = "weights.safetensors"
PROBA_TEST = "proba_test.npy"  # (n_test, classes) float64, rows in the real test split's order
PROBA_SYNTHETIC = "proba_synthetic.npy"  # TRTR job only: (n_synthetic, classes) for TRTS
# Torch threads of a classifier job when `classifier.threads` is None (see `_job_threads`).
JOB_THREADS = 1


class ClassifierJob(HeaderModel):
    """A classifier job directory's header (`job.json`), as `run_job` writes it."""

    job: str
    setting: str
    ratios: list[float] = Field(default_factory=list)
    train: str
    n_real: int
    n_synthetic: int
    image: dict[str, int]
    num_classes: int = Field(ge=2)
    torch_threads: int | None = None
    classifier: dict[str, Any]
    timings: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    """One classifier training of the audit."""

    name: str  # "trtr", "tstr" or "augmentation-<first ratio>"
    setting: str  # "trtr", "tstr" or "augmentation"
    ratios: tuple[float, ...]  # the augmentation ratios it serves (several when capped to the same data)
    n_synthetic: int  # synthetic images in its training set


def n_use(ratio: float, n_real: int, n_syn: int) -> int:
    return min(round(ratio * n_real), n_syn)


def _plan(cfg: UtilityConfig, n_real: int, n_syn: int) -> list[JobSpec]:
    """TRTR, TSTR, then one job per distinct augmentation subset size, named after its first (smallest) ratio."""
    jobs = [JobSpec("trtr", "trtr", (), 0), JobSpec("tstr", "tstr", (), n_syn)]
    by_size: dict[int, list[float]] = {}
    for ratio in cfg.ratios:  # sorted ascending by the config
        by_size.setdefault(n_use(ratio, n_real, n_syn), []).append(ratio)
    jobs += [JobSpec(f"augmentation-{ratios[0]:g}", "augmentation", tuple(ratios), n_use)
             for n_use, ratios in by_size.items()]
    return jobs


def plan_jobs(data: AuditInputs, cfg: UtilityConfig) -> list[JobSpec]:
    return _plan(cfg, len(data.train.images), len(data.synth.images))


def plan_classifier_jobs(real_dir: Path, synthetic_dir: Path, *, config: UtilityConfig | None = None) -> list[str]:
    """The names of the audit's classifier jobs, in a stable order: `trtr`, `tstr`, then `augmentation-<ratio>`
    for each distinct augmentation training set (ratios capped to the same synthetic subset share one job, named
    after the smallest). Each can run anywhere with `run_classifier_job`; `audit_utility(jobs=...)` merges them.

    Raises `InputError` when the two sets cannot be compared (the same checks as the audit).
    """
    cfg = config or UtilityConfig()
    return [job.name for job in plan_jobs(load_audit_inputs(real_dir, synthetic_dir), cfg)]


def job_threads(cfg: UtilityConfig) -> int:
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


def run_job(data: AuditInputs, cfg: UtilityConfig, job: JobSpec, out: Path) -> Path:
    """Train one classifier and write its job directory (weights, predicted probabilities, summary)."""
    from safetensors.torch import save_file

    threads = job_threads(cfg)
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


def job_spec(plan: Sequence[JobSpec], name: str) -> JobSpec:
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
    job = job_spec(plan_jobs(data, cfg), name)
    if out.exists():
        raise InputError(where(out, "already exists; choose another output or remove it"))
    return run_job(data, cfg, job, out)


def _first_difference(ours: Any, theirs: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted key, our value, their value) where two JSON configs differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in sorted(set(ours) | set(theirs)):
            diff = _first_difference(ours.get(k), theirs.get(k), f"{key}.{k}" if key else k)
            if diff:
                return diff
        return None
    return None if ours == theirs else (key or "config", ours, theirs)


def check_jobs(data: AuditInputs, cfg: UtilityConfig, plan: Sequence[JobSpec],
               jobs: Mapping[str, Path]) -> dict[str, ClassifierJob]:
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
    headers: dict[str, ClassifierJob] = {}
    for name in names:
        root = Path(jobs[name])
        header = read_header(root, JOB_HEADER, kind=JOB_KIND)
        if header["schema_version"] != JOB_SCHEMA_VERSION:
            raise InputError(where(root, f"job schema version {header['schema_version']} is not supported "
                                         f"(expected {JOB_SCHEMA_VERSION})"))
        job = parse_header(ClassifierJob, header, source=root / JOB_HEADER, what="classifier job header")
        if job.job != name:
            raise InputError(where(root, f"holds classifier job {job.job!r}, given as {name!r}"))
        for which, (digest, source) in ours.items():
            theirs = str(job.inputs.get(which))
            if theirs != digest:
                raise InputError(where(root, f"was trained for another {which} set (content hash {theirs[:12]}…, "
                                             f"{source} has {digest[:12]}…)"))
        diff = _first_difference(config, job.config)
        if diff:
            raise InputError(where(root, f"was trained with another config: {diff[0]} = {diff[2]!r}, this audit's "
                                         f"is {diff[1]!r}"))
        verify_content(root, header)
        headers[name] = job
    return headers


def load_job_classifier(root: Path, header: ClassifierJob, cfg: UtilityConfig) -> Classifier:
    """The job's trained classifier, rebuilt from its weights (for feature spaces computed at merge time)."""
    from safetensors.torch import load_file

    image = header.image
    model = SmallResNet(image["channels"], header.num_classes, width=cfg.classifier.width,
                        blocks_per_stage=cfg.classifier.blocks_per_stage,
                        image_size=min(image["height"], image["width"]))
    model.load_state_dict(load_file(str(root / WEIGHTS)))
    model.eval()
    s = header.classifier
    return Classifier(model=model, config=cfg.classifier, num_classes=header.num_classes,
                      image_shape=(image["height"], image["width"], image["channels"]), best_epoch=s["best_epoch"],
                      val_auroc=s["val_auroc"], history=s["history"], n_train=s["n_train"],
                      train_class_counts=s["train_class_counts"])


def announce(job: JobSpec, data: AuditInputs) -> str:
    """The progress line before a job trains."""
    n_real, n_syn = len(data.train.images), len(data.synth.images)
    if job.setting == "trtr":
        return f"TRTR: training on {n_real} real images"
    if job.setting == "tstr":
        return f"TSTR: training on {n_syn} synthetic images"
    return f"augmentation {job.ratios[0]:g}: training on {n_real} real + {job.n_synthetic} synthetic images"
