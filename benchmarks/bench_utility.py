"""Time each setting of the utility audit on full PneumoniaMNIST and compare TRTR AUROC with MedMNIST v2's reference.

Runs `reports.utility.audit_utility` end to end (TRTR, TRTS, TSTR, augmentation at each ratio, fidelity) with the
default classifier config and prints a Markdown table: seconds per setting, AUROC / accuracy with 95% bootstrap
CIs, and the measured TRTR AUROC against the MedMNIST v2 ResNet-18 (28) PneumoniaMNIST reference (AUC 0.944,
ACC 0.854; Yang et al., Scientific Data 2023, Table 3).

Without `--synthetic`, a *proxy* synthetic set is built for timing: every real training image, shifted by up to one
pixel and with Gaussian pixel noise (σ = 8 grey levels), keeping its label. It is not a generator's output, so its
TSTR/TRTS/fidelity numbers describe the proxy, not a model; the timings (which depend on set sizes, not pixel
values) are what it is for. Pass `--synthetic DIR` to audit a real synthetic set. The machine's load average is
printed before and after: cores are shared.

    .venv/bin/python benchmarks/bench_utility.py [--real DIR] [--synthetic DIR] [--epochs 8] [--threads 1]
                                                 [--ratios 0.5,1,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = {"model": "MedMNIST v2 ResNet-18 (28)", "auroc": 0.944, "accuracy": 0.854}


def proxy_synthetic(real_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """Degraded copies of the real training images (split "synthetic"): a timing stand-in for a generator."""
    import numpy as np

    from synth.data.canonical import load_dataset, write_dataset

    ds = load_dataset(real_dir)
    images, meta = ds.split("train")
    rng = np.random.default_rng(seed)
    shifted = np.empty_like(images)
    for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(images), 2))):
        shifted[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
    noisy = np.clip(shifted + rng.normal(0, 8, shifted.shape), 0, 255).astype(np.uint8)
    syn_meta = meta[["label"]].assign(image_id=[f"proxy-{i}" for i in range(len(meta))], split="synthetic")
    return write_dataset(out, noisy, syn_meta, class_names=ds.class_names,
                         source={"format": "proxy", "of": ds.content_hash, "noise_sigma": 8, "max_shift": 1})


def fmt(m: dict) -> str:
    if m.get("value") is None:
        return "–"
    ci = m.get("ci")
    return f"{m['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m['value']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, help="canonical real dataset (default: ingest pneumoniamnist.npz)")
    ap.add_argument("--synthetic", type=Path, help="canonical synthetic dataset (default: a degraded-copy proxy)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1, as the audit)")
    ap.add_argument("--ratios", default="0.5,1,2")
    ap.add_argument("--out", type=Path, help="where to keep the audit (default: a temporary directory)")
    args = ap.parse_args()

    import torch

    from reports.classifier import ClassifierConfig
    from reports.utility import HEADER, UtilityConfig, audit_utility, parse_ratios
    from synth.data.ingest import ingest
    from synth.data.locate import data_dir

    work = Path(tempfile.mkdtemp(prefix="bench-utility-"))
    real = args.real or ingest(data_dir() / "pneumoniamnist.npz", work / "real")
    synthetic = args.synthetic or proxy_synthetic(real, work / "proxy")
    classifier = ClassifierConfig(**({"epochs": args.epochs} if args.epochs else {}), threads=args.threads)
    cfg = UtilityConfig(classifier=classifier, ratios=parse_ratios(args.ratios))
    out = args.out or work / "audit"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    audit_utility(real, synthetic, out, config=cfg, progress=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}",
                                                                               flush=True))
    load_after = os.getloadavg()
    r = json.loads((out / HEADER).read_text())
    t = r["timings"]

    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {t['torch_threads']}, "
          f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min)")
    print(f"real: {r['data']['real']['train']['n']} train / {r['data']['real']['val']['n']} val / "
          f"{r['data']['real']['test']['n']} test; synthetic: {r['data']['synthetic']['n']} "
          f"({'proxy: degraded copies of real train' if args.synthetic is None else args.synthetic})")
    print(f"classifier: {json.dumps(r['config']['classifier'])}\n")
    print("| setting | train images | seconds | best epoch | AUROC [95% CI] | accuracy [95% CI] | F1 macro |")
    print("|---|---|---|---|---|---|---|")
    rows = [("TRTR", r["trtr"], t["trtr_s"], r["trtr"]["classifier"]),
            ("TRTS", r["trts"], t["trts_s"], None),
            ("TSTR", r["tstr"], t["tstr_s"], r["tstr"]["classifier"])]
    for p in r["augmentation"]["curve"][1:]:
        rows.append((f"real + {p['ratio']:g}× synthetic", p, t["augmentation_s"][f"{p['ratio']:g}"], p["classifier"]))
    for name, m, secs, clf in rows:
        n_train = clf["n_train"] if clf else "–"
        epoch = clf["best_epoch"] if clf else "–"
        print(f"| {name} | {n_train} | {secs:.1f} | {epoch} | {fmt(m['auroc'])} | {fmt(m['accuracy'])} | "
              f"{fmt(m['f1_macro'])} |")
    print(f"| fidelity (FID/KID/P/R) | – | {t.get('fidelity_s', 0):.1f} | – | – | – | – |")
    print(f"| **total** | | {t['total_s']:.1f} | | | | |")
    print(f"\nTRTR AUROC {fmt(r['trtr']['auroc'])} vs {REFERENCE['model']} {REFERENCE['auroc']}; "
          f"accuracy {fmt(r['trtr']['accuracy'])} vs {REFERENCE['accuracy']}")
    print(f"TSTR/TRTR AUROC ratio {fmt(r['tstr_over_trtr'])}")
    if r.get("fidelity"):
        s = r["fidelity"]["spaces"]["classifier"]
        for which in ("synthetic", "real_holdout"):
            o = s[which]["overall"]
            print(f"fidelity ({which} vs real train, classifier space): FID {o['fid']:.4g}, "
                  f"KID {o['kid']['value']:.3g} ± {o['kid']['std']:.2g}, precision {o['precision']:.3f}, "
                  f"recall {o['recall']:.3f}")
    print(f"\naudit: {out}")


if __name__ == "__main__":
    main()
