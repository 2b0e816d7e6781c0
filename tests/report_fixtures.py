"""Inputs for the audit report's tests, built once per session on the small real slice.

- real: the `pneumonia_slice` (64 train / 32 val / 32 test real images) re-written with an HTML-injection class
  name (class names come from users' CSVs: untrusted) and a duplicate record in its header.
- model: a model directory with only what the report reads: `model_card.json` (DP claim) and `privacy_ledger.json`
  (an RDP ledger whose ε was computed once with dp_accounting, so the privacy audit's ledger check agrees). No
  weights: the report never loads them.
- synthetic: blurry per-class mean images plus noise and shifts (pixels that are no real image), one planted
  exact copy of a real training image (the memorization audit must flag it; the public report must not show it),
  and one synthetic id that is an HTML injection.
- privacy: the real `privacy.audit.audit_privacy` (tiny encoder); its `membership` entry, null until the
  membership audit is wired in, is filled with an entry in `privacy.membership.membership_summary`'s schema built
  from scores drawn here (running the attack needs trained weights).
- utility: the real `reports.utility.audit_utility` with a small classifier and few bootstrap resamples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synth.artifacts import write_header, write_json
from synth.data.canonical import load_dataset, write_dataset

INJECTED_CLASS = "pneumonia <script>alert('class')</script>"
CLASS_NAMES = ("normal", INJECTED_CLASS)
INJECTED_ID = "syn-<script>alert('id')</script>"
INJECTED_MESSAGE = "reviewer note <img src=x onerror=alert(1)>"
COPY_ID = "syn-planted-copy"
# σ = 1.1, q = 0.0136, 1500 steps, δ = 1e-5, RDP at Opacus' orders: dp_accounting 0.6.0 gives this ε.
LEDGER_EPSILON = 2.8826193682931147
_CACHE: dict[str, dict[str, Any]] = {}


def _real(out: Path, slice_dir: Path) -> Path:
    ds = load_dataset(slice_dir)
    meta = ds.metadata.drop(columns="sha256")
    train_ids = meta.loc[meta["split"] == "train", "image_id"].tolist()
    duplicates = {
        "policy": "collapse", "groups": 1, "within_split": 1, "across_splits": 0, "label_conflicts": 0,
        "images_in_groups": 2, "removed": 1, "removed_per_split": {"train": 1},
        "group_list": [{"image_ids": train_ids[:2], "splits": ["train"], "labels_agree": True,
                        "spans_splits": False}],
    }
    return write_dataset(out, np.asarray(ds.images), meta, class_names=CLASS_NAMES, source=ds.header["source"],
                         license=ds.header["license"], attribution=ds.header["attribution"], duplicates=duplicates)


def _model(out: Path, real_hash: str) -> Path:
    from privacy.ledger import DPSGDEvent, PrivacyLedger
    from synth.model_dir import LEDGER, privacy_summary

    ledger = PrivacyLedger(
        events=(DPSGDEvent(noise_multiplier=1.1, sample_rate=0.0136, steps=1500),), delta=1e-5, accountant="rdp",
        epsilon=LEDGER_EPSILON, target_epsilon=3.0, max_grad_norm=1.0, noise_multiplicity=4, dataset_size=4690,
        batch_size=64, grad_sample_mode="hooks",
        epsilon_check={"library": "dp-accounting 0.6.0", "method": "rdp", "epsilon": LEDGER_EPSILON},
    ).to_dict()
    out.mkdir(parents=True)
    write_json(out / LEDGER, ledger)
    write_header(
        out, "model_card.json", kind="model", schema_version=1, files=[LEDGER], inputs={"dataset": real_hash},
        config={"model": {"name": "tiny"}, "test_fixture": True},
        body={"class_names": list(CLASS_NAMES), "image": {"height": 28, "width": 28, "channels": 1},
              "privacy": privacy_summary(epsilon=LEDGER_EPSILON, ledger=ledger, noise_multiplicity=4),
              "steps": 1500, "epochs": 20.4, "train_images": 4690, "training_seconds": 812.5, "device": "cpu",
              "stopped_by": "target_epsilon", "final_loss": 0.061},
    )
    return out


def _synthetic(out: Path, real_dir: Path, model_dir: Path, model_hash: str) -> Path:
    ds = load_dataset(real_dir)
    images, meta = ds.split("train")
    labels = meta["label"].to_numpy()
    rng = np.random.default_rng(0)
    out_images, out_labels = [], []
    for c in range(len(CLASS_NAMES)):
        mean = images[labels == c].astype(np.float64).mean(axis=0)
        for _ in range(20):
            img = mean + rng.normal(0.0, 18.0, mean.shape)
            img = np.roll(img, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
            out_images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
            out_labels.append(c)
    copy_row = int(np.flatnonzero(labels == 1)[0])
    out_images.append(np.asarray(images[copy_row]))
    out_labels.append(1)
    ids = [f"syn-{i:04d}" for i in range(len(out_images) - 1)] + [COPY_ID]
    ids[3] = INJECTED_ID
    frame = pd.DataFrame({"image_id": ids, "split": "synthetic", "label": out_labels})
    return write_dataset(out, np.stack(out_images), frame, class_names=CLASS_NAMES,
                         source={"kind": "synthetic", "generator": "report test fixture", "model": model_hash},
                         inputs={"model": model_hash},
                         extra={"generation": {"model": str(model_dir), "model_content_hash": model_hash}})


def _membership() -> dict[str, Any]:
    """A `membership` entry in the schema of `privacy.membership.membership_summary`, from drawn scores."""
    from privacy.roc import downsample_roc, roc_auc, roc_curve, tpr_at_fpr

    rng = np.random.default_rng(1)
    attacks = {}
    for name, shift in (("loss", 0.15), ("pia", 0.3)):
        members, non = rng.normal(shift, 1.0, 200), rng.normal(0.0, 1.0, 200)
        fpr, tpr = roc_curve(members, non)
        auc = roc_auc(members, non)
        t1, t01 = tpr_at_fpr(members, non, 0.01), tpr_at_fpr(members, non, 0.001)
        attacks[name] = {"auc": auc, "auc_ci": [auc - 0.05, auc + 0.05], "tpr_at_1pct_fpr": t1,
                         "tpr_at_1pct_fpr_ci": [0.0, t1 + 0.04], "tpr_at_0_1pct_fpr": t01,
                         "tpr_at_0_1pct_fpr_ci": [0.0, t01 + 0.02], "timesteps": [50, 100, 200],
                         "roc": downsample_roc(fpr, tpr, 120, min_fpr=1 / 200)}
    best = max(attacks, key=lambda k: attacks[k]["auc"])
    return {"status": "measured", "auc": attacks[best]["auc"], "auc_ci": attacks[best]["auc_ci"],
            "auc_attack": best, "tpr_at_1pct_fpr": max(a["tpr_at_1pct_fpr"] for a in attacks.values()),
            "tpr_at_0_1pct_fpr": max(a["tpr_at_0_1pct_fpr"] for a in attacks.values()),
            "n_members": 200, "n_nonmembers": 200, "weights": "ema", "ci_level": 0.95, "attacks": attacks,
            "note": "200 members vs 200 non-members (test fixture scores).",
            "explanation": "A white-box attacker guesses whether an image was in the training set."}


def _privacy(out: Path, real: Path, synthetic: Path, model: Path) -> Path:
    from privacy.audit import HEADER, audit_privacy
    from privacy.audit_config import PrivacyAuditConfig
    from privacy.embeddings import AugmentConfig, EncoderConfig
    from synth.artifacts import content_hash

    encoder = EncoderConfig(steps=12, batch_size=32, widths=(8, 16, 16), hidden=32, dim=16, augment=AugmentConfig())
    # The fixture's model dir holds only a card and a ledger (no weights): membership scores are planted below.
    audit_privacy(real, synthetic, out, model_dir=model, config=PrivacyAuditConfig(encoder=encoder, membership=None))
    header = json.loads((out / HEADER).read_text())
    header["membership"] = _membership()
    # The payload is unchanged (membership lives in the header), so the content hash stays valid.
    assert header["content_hash"] == content_hash(out, header["files"])
    write_json(out / HEADER, header)
    return out


def _utility(out: Path, real: Path, synthetic: Path) -> Path:
    import torch

    from reports.classifier import ClassifierConfig
    from reports.fidelity import FidelityConfig
    from reports.utility import UtilityConfig, audit_utility

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = UtilityConfig(classifier=ClassifierConfig(epochs=3, width=8, batch_size=32, threads=1, min_steps=None),
                            ratios=(1.0,), n_boot=200,
                            fidelity_config=FidelityConfig(kid_subset_size=16, kid_subsets=5))
        return audit_utility(real, synthetic, out, config=cfg)
    finally:
        torch.set_num_threads(before)


def build_report_inputs(root: Path, pneumonia_slice: Path) -> dict[str, Any]:
    """Build (once per process) every input of `render_report` under `root`; returns the paths."""
    key = str(root)
    if key in _CACHE:
        return _CACHE[key]
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    real = _real(root / "real", pneumonia_slice)
    real_hash = load_dataset(real).content_hash
    model = _model(root / "model", real_hash)
    model_hash = json.loads((model / "model_card.json").read_text())["content_hash"]
    synthetic = _synthetic(root / "synthetic", real, model, model_hash)
    privacy = _privacy(root / "privacy", real, synthetic, model)
    utility = _utility(root / "utility", real, synthetic)
    _CACHE[key] = {"root": root, "real": real, "model": model, "synthetic": synthetic, "privacy": privacy,
                   "utility": utility}
    return _CACHE[key]


def verdict_for(inputs: dict[str, Any]) -> dict[str, Any]:
    """A gate verdict (flows.policy.Verdict JSON) that produces every status: the TSTR/TRTR ratio passes with a
    threshold inside its CI (amber), membership AUC passes clearly (green), disclosure fails (red); one message
    carries an HTML injection."""
    u = json.loads((Path(inputs["utility"]) / "utility.json").read_text())
    ratio = u["tstr_over_trtr"]
    lo, v = ratio["ci"][0], ratio["value"]
    threshold = round((lo + v) / 2, 6)
    return {
        "decision": "block",
        "checks": [
            {"rule": "min_tstr_trtr_ratio", "passed": True, "value": v, "threshold": threshold,
             "message": f"TSTR/TRTR AUROC ratio {v:.4g} >= {threshold:g}"},
            {"rule": "max_membership_auc", "passed": True, "value": 0.6, "threshold": 0.95,
             "message": "membership AUC 0.6 <= 0.95"},
            {"rule": "disclosure_k", "passed": False, "value": 2, "threshold": 5, "message": INJECTED_MESSAGE},
        ],
    }
