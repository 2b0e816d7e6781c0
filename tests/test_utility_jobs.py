"""The utility audit as separately runnable classifier jobs: the merge of job directories made in another process
(as a Dask worker would) equals the in-process audit; jobs that do not belong to the audit are refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reports.classifier import ClassifierConfig
from reports.fidelity import FidelityConfig
from reports.utility import (
    HEADER,
    JOB_HEADER,
    JOB_KIND,
    PROBA_SYNTHETIC,
    PROBA_TEST,
    ROC,
    WEIGHTS,
    UtilityConfig,
    audit_utility,
    plan_classifier_jobs,
    run_classifier_job,
)
from synth.artifacts import read_header
from synth.data.canonical import load_dataset, write_dataset
from synth.errors import InputError, IntegrityError

REPO = Path(__file__).resolve().parents[1]
# threads=None on purpose: jobs must pin torch's thread count themselves.
CFG = UtilityConfig(
    classifier=ClassifierConfig(epochs=2, width=4, batch_size=16, min_steps=None),
    ratios=(0.5, 1.0, 2.0),
    n_boot=50,
    fidelity_config=FidelityConfig(kid_subset_size=20, kid_subsets=3),
)
PLAN = ["trtr", "tstr", "augmentation-0.5", "augmentation-1"]  # 64 real train, 64 synthetic: ratio 2 caps to 1
# A worker: another process, another ambient torch thread count (training results depend on it unless pinned).
WORKER = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)
from reports.utility import UtilityConfig, run_classifier_job

cfg = UtilityConfig.model_validate_json(sys.argv[1])
real, synthetic, out = map(Path, sys.argv[2:5])
for name in sys.argv[5:]:
    run_classifier_job(real, synthetic, name, out / name, config=cfg)
"""


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(src: Path, out: Path, keep: np.ndarray, split: str | None = None) -> Path:
    ds = load_dataset(src)
    meta = ds.metadata[keep].drop(columns="sha256").reset_index(drop=True)
    if split is not None:
        meta["split"] = split
    return write_dataset(out, np.asarray(ds.images)[keep], meta, class_names=ds.class_names, source={"format": "test"})


@pytest.fixture(scope="module")
def sets(pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The slice as the real set, its 64 val + test images as the 'synthetic' set (different images from real
    train, so no two jobs train on the same data), and another real set (two train images fewer)."""
    root = tmp_path_factory.mktemp("jobs-sets")
    meta = load_dataset(pneumonia_slice).metadata
    train = (meta["split"] == "train").to_numpy()
    other = np.ones(len(meta), bool)
    other[np.flatnonzero(train)[:2]] = False
    return {"real": pneumonia_slice, "synthetic": _write(pneumonia_slice, root / "synthetic", ~train, "synthetic"),
            "other_real": _write(pneumonia_slice, root / "other-real", other)}


@pytest.fixture(scope="module")
def runs(sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The in-process audit, and the same audit merged from job dirs (two of them made in a subprocess)."""
    root = tmp_path_factory.mktemp("jobs")
    real, syn = sets["real"], sets["synthetic"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one; the worker runs with 2
    try:
        inproc = audit_utility(real, syn, root / "inproc", config=CFG)
        names = plan_classifier_jobs(real, syn, config=CFG)
        worker = ["trtr", "augmentation-1"]
        subprocess.run([sys.executable, "-c", WORKER, CFG.model_dump_json(), str(real), str(syn), str(root),
                        *worker], cwd=REPO, check=True, capture_output=True, timeout=300)
        for name in names:
            if name not in worker:
                run_classifier_job(real, syn, name, root / name, config=CFG)
        jobs = {name: root / name for name in names}
        merged = audit_utility(real, syn, root / "merged", config=CFG, jobs=jobs)
    finally:
        torch.set_num_threads(before)
    return {"names": names, "jobs": jobs, "inproc": inproc, "merged": merged, "root": root}


def _body(audit: Path) -> dict:
    header = json.loads((audit / HEADER).read_text())
    return {k: v for k, v in header.items() if k not in ("timings", "created")}


def test_merge_of_jobs_from_another_process_equals_the_in_process_audit(runs: dict, sets: dict[str, Path]) -> None:
    assert runs["names"] == PLAN
    inproc, merged = _body(runs["inproc"]), _body(runs["merged"])
    assert merged == inproc  # metrics, CIs, curve, fidelity, classifier summaries, job content hashes, inputs
    assert (runs["merged"] / ROC).read_bytes() == (runs["inproc"] / ROC).read_bytes()
    assert set(merged["classifier_jobs"]) == set(PLAN)
    # Not vacuous: the audit has its settings, and the capped ratio 2 is the ratio-1 classifier.
    assert merged["fidelity"]["spaces"]["classifier"]["synthetic"]["overall"]["fid"] > 0
    assert merged["tstr"]["auroc"] != merged["trtr"]["auroc"]
    one, two = merged["augmentation"]["curve"][2:]
    assert one["n_synthetic"] == two["n_synthetic"] == 64 and two["auroc"] == one["auroc"]
    assert "train_seconds" not in merged["trtr"]["classifier"]  # timings live in `timings` only
    timings = json.loads((runs["merged"] / HEADER).read_text())["timings"]
    assert set(timings["jobs_s"]) == set(PLAN) and timings["torch_threads"] == 1

    job = read_header(runs["jobs"]["trtr"], JOB_HEADER, kind=JOB_KIND)
    assert job["files"] == sorted([WEIGHTS, PROBA_TEST, PROBA_SYNTHETIC]) and job["torch_threads"] == 1
    assert job["inputs"] == {"real": load_dataset(sets["real"]).content_hash,
                             "synthetic": load_dataset(sets["synthetic"]).content_hash}
    assert job["config"] == CFG.model_dump(mode="json")
    assert np.load(runs["jobs"]["trtr"] / PROBA_TEST).shape == (32, 2)
    assert read_header(runs["jobs"]["augmentation-1"], JOB_HEADER)["ratios"] == [1.0, 2.0]
    with pytest.raises(InputError, match="already exists"):
        run_classifier_job(sets["real"], sets["synthetic"], "tstr", runs["jobs"]["tstr"], config=CFG)


def _refused(runs: dict, sets: dict[str, Path], jobs: dict, error: type, pattern: str) -> str:
    out = runs["root"] / "refused"
    with pytest.raises(error, match=pattern) as caught:
        audit_utility(sets["real"], sets["synthetic"], out, config=CFG, jobs=jobs)
    assert not out.exists()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_jobs_that_do_not_belong_to_the_audit_are_refused(runs: dict, sets: dict[str, Path]) -> None:
    jobs, root = runs["jobs"], runs["root"]
    foreign_real = run_classifier_job(sets["other_real"], sets["synthetic"], "trtr", root / "foreign-real",
                                      config=CFG)
    _refused(runs, sets, {**jobs, "trtr": foreign_real}, InputError,
             rf"^{re.escape(str(foreign_real))}: was trained for another real set")
    foreign_cfg = run_classifier_job(sets["real"], sets["synthetic"], "tstr", root / "foreign-config",
                                     config=CFG.model_copy(update={"classifier": ClassifierConfig(
                                         epochs=1, width=4, batch_size=16, min_steps=None)}))
    _refused(runs, sets, {**jobs, "tstr": foreign_cfg}, InputError,
             rf"^{re.escape(str(foreign_cfg))}: was trained with another config: classifier.epochs = 1, "
             r"this audit's is 2$")
    missing = {k: v for k, v in jobs.items() if k != "tstr"}
    _refused(runs, sets, missing, InputError, r"classifier job\(s\) tstr missing; this audit needs exactly trtr, "
                                              r"tstr, augmentation-0.5, augmentation-1")
    _refused(runs, sets, {**jobs, "augmentation-2": jobs["augmentation-1"]}, InputError,
             rf"^{re.escape(str(jobs['augmentation-1']))}: is given as classifier job 'augmentation-2', "
             r"which this audit does not have")
    _refused(runs, sets, {**jobs, "trtr": jobs["tstr"], "tstr": jobs["trtr"]}, InputError,
             rf"^{re.escape(str(jobs['tstr']))}: holds classifier job 'tstr', given as 'trtr'")
    _refused(runs, sets, {**jobs, "trtr": sets["real"]}, InputError, r"is not a synthgate artifact \(no job.json\)")
    tampered = root / "tampered"
    shutil.copytree(jobs["trtr"], tampered)
    np.save(tampered / PROBA_TEST, np.full((32, 2), 0.5))
    _refused(runs, sets, {**jobs, "trtr": tampered}, IntegrityError,
             rf"^{re.escape(str(tampered))}: content hash does not match")


def test_unknown_job_name_lists_the_valid_ones(sets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "job"
    # Ratio 2 is capped to ratio 1's data here, so it has no job of its own.
    with pytest.raises(InputError, match=r"^job 'augmentation-2': is not a classifier job of this utility audit; "
                                         r"valid: trtr, tstr, augmentation-0.5, augmentation-1$"):
        run_classifier_job(sets["real"], sets["synthetic"], "augmentation-2", out, config=CFG)
    assert not out.exists()
    # With fewer real images ratio 1 no longer needs all 64 synthetic ones: ratio 2 gets a job.
    assert plan_classifier_jobs(sets["other_real"], sets["synthetic"], config=CFG) == [*PLAN, "augmentation-2"]


def test_in_process_audit_runs_each_training_once(sets: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process audit trains through the job code: once per planned job (ratio 2 reuses ratio 1)."""
    import reports.utility as utility

    calls: list[str] = []
    real_run = utility._run_job
    monkeypatch.setattr(utility, "_run_job", lambda data, cfg, job, out: calls.append(job.name)
                        or real_run(data, cfg, job, out))
    cfg = CFG.model_copy(update={"fidelity": False, "n_boot": 10})
    audit_utility(sets["real"], sets["synthetic"], tmp_path / "audit", config=cfg)
    assert calls == PLAN
