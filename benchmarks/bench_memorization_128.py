"""The memorization check at 128×128 (16,384-d pixels): exact faiss search cost and planted-copy recall.

Ingests `kermany_cxr_128.npz` (the Kermany pediatric chest X-rays behind PneumoniaMNIST, 128 px; train 4694,
holdout val + test 1146), then runs the planted-copy harness (`tests/planted.py`: edited copies of random
training images among the real holdout images, 2-fold cross-fitted) in all three spaces (pixel: exact faiss
search at 16k-d; learned: the copy-detection encoder on its 4×-pooled 32-px view, trained for `--encoder-steps`;
registered: geometric verification of the candidates), and prints its table with the check's time. The edits are
the harness's 28-px ones (1-2 px shifts, 24/28 crop-resize), which at 128 px are relatively smaller.

Candidate recall is measured apart from verification: for a separate draw of copies per edit, the share whose
source is among the candidates registration verifies (the `candidates` nearest training images per faiss space
and query view). A copy whose source is not among them cannot be found by registration at all.

    .venv/bin/python benchmarks/bench_memorization_128.py [--planted 100] [--encoder-steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def candidate_recall(train, encoder, config, per_transform: int, seed: int = 1) -> dict[str, dict[str, float]]:
    """Per target edit: the share of copies whose source is among the registration candidates of each faiss space
    (pixel: the copy itself; learned: the copy and its mirror image), and of either."""
    import faiss
    import numpy as np

    from privacy.embeddings import PixelSpace
    from tests.planted import TRANSFORMS, apply_transform

    rng = np.random.default_rng(seed)
    k = config.registration.candidates
    models = {"pixel": PixelSpace(), **({"learned": encoder} if encoder is not None else {})}
    indexes = {}
    for name, model in models.items():
        indexes[name] = faiss.IndexFlatIP(model.embed(train[:1]).shape[1])
        indexes[name].add(model.embed(train))
    out = {}
    for edit in (t for t, spec in TRANSFORMS.items() if spec.target):
        src = rng.choice(len(train), min(per_transform, len(train)), replace=False)
        copies = apply_transform(train[src], edit, rng)
        hit = {}
        for name, model in models.items():
            views = [copies] + ([np.ascontiguousarray(copies[:, :, ::-1])] if name == "learned" else [])
            rows = np.concatenate([indexes[name].search(model.embed(v), k)[1] for v in views], axis=1)
            # the source, or a pixel-identical training image
            hit[name] = np.array([(train[r] == train[s]).all(axis=(1, 2)).any() for r, s in zip(rows, src,
                                                                                            strict=True)])
        out[edit] = {**{n: float(h.mean()) for n, h in hit.items()},
                     "either": float(np.mean(np.any(list(hit.values()), axis=0)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planted", type=int, default=100, help="copies per edit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoder-steps", type=int, default=300, help="copy-detection encoder steps (0: no learned)")
    ap.add_argument("--data", type=Path, default=None, help="directory holding kermany_cxr_128.npz")
    args = ap.parse_args()

    import faiss
    import torch

    from privacy.embeddings import EncoderConfig, train_encoder, training_data_id
    from privacy.memorization_config import MemorizationConfig
    from synth.data.canonical import load_dataset
    from synth.data.ingest import ingest
    from synth.data.locate import data_dir
    from tests.planted import run_planted

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    source = (args.data or data_dir()) / "kermany_cxr_128.npz"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        real = ingest(source, Path(tmp) / "real")
        print(f"ingest {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores")
        ds = load_dataset(real)
        train = ds.split("train")[0]
        encoder = None
        if args.encoder_steps:
            t0 = time.perf_counter()
            encoder = train_encoder(train, EncoderConfig(steps=args.encoder_steps),
                                    data_hash=training_data_id(ds.content_hash))
            print(f"encoder: {args.encoder_steps} steps in {time.perf_counter() - t0:.1f} s")
        spaces = ("pixel", "learned", "registered") if encoder is not None else ("pixel", "registered")
        config = MemorizationConfig(spaces=spaces)
        t0 = time.perf_counter()
        result = run_planted(real, encoder=encoder, config=config, per_transform=args.planted)
        print(f"planted-copy harness {time.perf_counter() - t0:.1f} s in all "
              f"(check itself {result.setup.get('check_seconds', float('nan'))})")
        print(result.markdown())
        reg = [t["registered"]["seconds"] for f in result.summary.values()
               for t in (f["timings"]["reference"], *f["timings"]["shards"]) if "registered" in t]
        print(f"registration: {sum(reg):.1f} s of the check (null and synthetic, both folds); load average "
              f"{os.getloadavg()[0]:.1f}")
        t0 = time.perf_counter()
        recall = candidate_recall(train, encoder, config, args.planted)
        print(f"candidate recall (source among the {config.registration.candidates} candidates per space and "
              f"query view; separate draw, {time.perf_counter() - t0:.1f} s):")
        for edit, r in recall.items():
            print(f"  {edit:14s} " + "  ".join(f"{n} {v:.3f}" for n, v in r.items()))
        for f in result.setup["folds"]:
            print(f"fold {f['calibration_split']} -> {f['clean_split']}: {f['clean_images']} clean, false-flag rate "
                  f"{f['false_flag_rate']:.4f}, thresholds {f['thresholds']}")


if __name__ == "__main__":
    main()
