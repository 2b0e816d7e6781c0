"""Sampler fidelity on a trained model: FID, KID, precision/recall, TRTS, images/s and network evaluations.

    .venv/bin/python benchmarks/bench_sampler_fid.py --model demo-output/work/model \\
        --real demo-output/work/dataset --n 600 --threads 1 \\
        --samplers ddim-50,ddim-25,sde-dpmsolver++-20,sde-dpmsolver++-karras-20

Every sampler generates the same images a release would (`synth.generate.generate`: the same plan of conditions
and per-image seeds for `--n`/`--seed`, UNet batch 64), so the configs are compared on identical noise. A sampler is
a shipped name or ALGORITHM[-karras|-lu][-STEPS] (see `synth.sampling.resolve_sampler`), optionally followed by
`:field=value,...` overrides of `SamplerConfig` fields, e.g. `ddim-25:timestep_spacing=linspace` or
`dpmsolver++-karras-20:sample_max_value=5`.

The feature space is the utility audit's (`reports/utility.py`): the TRTR classifier (default `ClassifierConfig`)
trained on the real train split, selected on val, penultimate layer; FID/KID/precision/recall against real train
(`reports.fidelity.fidelity_metrics`), TRTS = accuracy of that classifier on the synthetic images against the label
each was conditioned on. The real holdout (val + test) against real train is printed as the floor. **The space
depends on the classifier's code and torch thread count** (its weight gradients are summed per thread): by default
the classifier is trained with the audit's own thread count (`reports.utility.JOB_THREADS`), so the numbers are
those `synthgate audit utility` would report. FID differences between two samplers are only meaningful within one
run (one classifier): a retrained or changed classifier moves every FID. `--extra-seeds 1,2` adds classifiers
trained with other seeds and `--encoder DIR` the privacy audit's copy-detection encoder, as checks that a ranking
is not an artefact of one feature space. Images/s is the whole `generate` call (model load and writing included)
at `--threads`; network evaluations are counted UNet forward rows per image (a guided step costs 2). Prints a
Markdown table; `--json PATH` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_sampler(spec: str):
    """'NAME[:field=value,...]' → SamplerConfig (values parsed as JSON when they are, else kept as strings)."""
    from synth.sampling import resolve_sampler

    name, _, overrides = spec.strip().partition(":")
    cfg = resolve_sampler(name)
    if not overrides:
        return cfg
    fields: dict[str, Any] = {}
    for part in overrides.split(","):
        key, sep, raw = part.partition("=")
        if not sep:
            raise SystemExit(f"sampler {spec!r}: override {part!r} is not field=value")
        try:
            fields[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key.strip()] = raw.strip()
    return resolve_sampler(cfg.model_copy(update=fields))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="trained model directory")
    ap.add_argument("--real", type=Path, required=True, help="the canonical real dataset the model was trained on")
    ap.add_argument("--samplers", default="ddim-50,ddim-25,sde-dpmsolver++-20,sde-dpmsolver++-karras-20")
    ap.add_argument("--reference", default=None, help="sampler FID ratios are computed against (default: first)")
    ap.add_argument("--n", type=int, default=600, help="images per sampler")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (the plan of per-image seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while sampling and scoring")
    ap.add_argument("--classifier-threads", type=int, default=None,
                    help="torch threads while training the classifiers (default: the utility audit's)")
    ap.add_argument("--extra-seeds", default="", help="more classifier seeds as extra FID spaces, e.g. 1,2")
    ap.add_argument("--encoder", type=Path, default=None, help="copy-detection encoder dir: an extra FID space")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = ap.parse_args()

    import numpy as np
    import torch
    from diffusers import UNet2DModel

    from reports.classifier import ClassifierConfig, train_classifier
    from reports.fidelity import FidelityConfig, fid, fidelity_metrics
    from reports.utility import JOB_THREADS
    from synth.data.canonical import load_dataset
    from synth.generate import generate
    from synth.sampling import compare_intensity

    labels = [s.strip() for s in args.samplers.split(",") if s.strip()]
    samplers = [parse_sampler(s) for s in labels]
    ref_label = args.reference or labels[0]
    if ref_label not in labels:
        raise SystemExit(f"--reference {ref_label!r} is not one of --samplers")

    real = load_dataset(args.real)
    (xtr, mtr), (xva, mva), (xte, _) = (real.split(s) for s in ("train", "val", "test"))
    ytr, yva = mtr["label"].to_numpy(np.int64), mva["label"].to_numpy(np.int64)
    k = len(real.class_names)

    spaces: dict[str, Any] = {}
    t0 = time.perf_counter()
    seeds = [0] + [int(s) for s in args.extra_seeds.split(",") if s.strip()]
    args.classifier_threads = args.classifier_threads or JOB_THREADS
    for seed in seeds:
        torch.set_num_threads(args.classifier_threads)
        clf = train_classifier(np.asarray(xtr), ytr, np.asarray(xva), yva, config=ClassifierConfig(seed=seed),
                               num_classes=k)
        spaces["audit" if seed == 0 else f"classifier seed {seed}"] = clf
    print(f"classifiers trained in {time.perf_counter() - t0:.0f}s", flush=True)
    torch.set_num_threads(args.threads)
    audit = spaces["audit"]
    real_feats = {name: clf.features(np.asarray(xtr)) for name, clf in spaces.items()}
    encoder = None
    if args.encoder is not None:
        from privacy.embeddings import load_encoder

        encoder = load_encoder(args.encoder)
        real_feats["encoder"] = encoder.embed(np.asarray(xtr))
    holdout = np.concatenate([np.asarray(xva), np.asarray(xte)])
    floor = fid(real_feats["audit"], audit.features(holdout))

    evals = {"rows": 0}

    def count(module, inputs, output):  # every UNet2DModel forward, whichever pipeline generate() builds
        if isinstance(module, UNet2DModel):
            evals["rows"] += int(inputs[0].shape[0])

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in zip(labels, samplers, strict=True):
            out = Path(tmp) / f"s{len(rows)}"
            evals["rows"] = 0
            start = time.perf_counter()
            generate(args.model, out, n=args.n, sampler=cfg, seed=args.seed, batch_size=64, device=args.device,
                     progress=False)
            seconds = time.perf_counter() - start
            syn = load_dataset(out)
            images = np.asarray(syn.images)
            cond_labels = syn.metadata["label"].to_numpy(np.int64)
            padded = -(-args.n // min(64, args.n)) * min(64, args.n)  # generate() pads the last batch
            m = fidelity_metrics(real_feats["audit"], audit.features(images), config=FidelityConfig())
            row = {
                "sampler": label, "config": cfg.model_dump(mode="json"), "evals_per_image": evals["rows"] / padded,
                "seconds": round(seconds, 1), "images_per_s": args.n / seconds, "fid": m["fid"],
                "kid": m["kid"]["value"], "kid_std": m["kid"]["std"], "precision": m["precision"],
                "recall": m["recall"],
                "trts": float((audit.predict_proba(images).argmax(1) == cond_labels).mean()),
                "fid_other": {name: fid(real_feats[name], clf.features(images))
                              for name, clf in spaces.items() if name != "audit"},
                "intensity_w1": compare_intensity(images, np.asarray(xtr))["w1"],
            }
            if encoder is not None:
                row["fid_other"]["encoder"] = fid(real_feats["encoder"], encoder.embed(images))
            rows.append(row)
            print(f"  {label}: FID {row['fid']:.3f}, {seconds:.0f}s", flush=True)
            shutil.rmtree(out)
    hook.remove()

    ref = next(r for r in rows if r["sampler"] == ref_label)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmodel {args.model}; {args.n} images per sampler, seed {args.seed}; real {args.real} "
          f"(train {len(xtr)}); sampling threads {args.threads}, classifier threads {args.classifier_threads}; "
          f"device {args.device}; load {load:.1f}; {platform.processor() or platform.machine()}")
    print(f"real holdout (val+test, {len(holdout)}) vs train FID floor: {floor:.3f}")
    other = [name for name in rows[0]["fid_other"]]
    head = ["sampler", "network evals / image", "images/s", "FID", f"FID / {ref_label}", "KID", "precision",
            "recall", "TRTS accuracy", "intensity W1"] + [f"FID ({name})" for name in other]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["sampler"], f"{r['evals_per_image']:g}", f"{r['images_per_s']:.1f}", f"{r['fid']:.2f}",
                 f"{r['fid'] / ref['fid']:.2f}", f"{r['kid']:.2f}", f"{r['precision']:.2f}", f"{r['recall']:.2f}",
                 f"{r['trts']:.3f}", f"{r['intensity_w1']:.3f}"]
        cells += [f"{r['fid_other'][name]:.2f}" + (f" ({r['fid_other'][name] / ref['fid_other'][name]:.2f}×)")
                  for name in other]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "floor_fid": floor,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
