"""Benchmark of the memorization check, and the full planted-copy table.

1. The whole check (embedding in all spaces included: pixel, learned with mirrored queries, registration) over
   60k training × 10k synthetic images at 28×28, target <= 30 s on 2 cores. The training set is the real
   PneumoniaMNIST training split tiled with perturbations (each extra copy shifted by up to 1 px and given
   Gaussian noise σ = 3 grey levels, so no two are pixel-identical); the synthetic set is the real holdout tiled
   the same way; the null is the real holdout.
2. faiss exact search against a numpy brute-force baseline (matmul + argmax) on the same pixel embeddings.
3. How the whole check grows with the training set (10k, 60k, 250k by tiling).
4. The planted-copy table on the full real data (cross-fitted over the pooled holdout).

The copy-detection encoder is trained once per real dataset (its time is reported apart) or loaded (--encoder).

    .venv/bin/python benchmarks/bench_memorization.py [--threads 2] [--also-threads N] [--encoder DIR]
        [--save-encoder DIR] [--sizes 10000,60000,250000] [--synthetic 10000] [--planted 300] [--skip-planted]

`--threads` sets both torch's and faiss' thread counts; `--also-threads N` times the 60k check once more with N
threads (on a shared machine fewer threads can be faster: other processes hold the cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The repository root: the planted-copy harness lives in tests/ (a test and benchmark harness, not product code).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_avg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def tile(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` images: the originals, then perturbed copies (shift up to 1 px, noise σ = 3) until there are n."""
    from tests.planted import shift

    rng = np.random.default_rng(seed)
    parts, have = [images[:n]], min(n, len(images))
    while have < n:
        take = images[: min(len(images), n - have)]
        moved = shift(take, rng.integers(-1, 2, len(take)), rng.integers(-1, 2, len(take)))
        noisy = np.clip(np.round(moved.astype(np.float32) + rng.normal(0, 3.0, moved.shape)), 0, 255)
        parts.append(noisy.astype(np.uint8))
        have += len(take)
    return np.concatenate(parts)


def image_set(images: np.ndarray, prefix: str):
    from privacy.image_set import ImageSet
    from synth.data.canonical import pixel_sha256

    ids = np.array([f"{prefix}-{i:06d}" for i in range(len(images))], dtype=object)
    return ImageSet(images=images, ids=ids, sha256=np.asarray(pixel_sha256(images)), name=prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also-threads", type=int, default=None)
    ap.add_argument("--encoder", type=Path, default=None, help="a saved encoder trained on the real train split")
    ap.add_argument("--save-encoder", type=Path, default=None)
    ap.add_argument("--sizes", default="10000,60000,250000")
    ap.add_argument("--synthetic", type=int, default=10_000)
    ap.add_argument("--planted", type=int, default=300, help="copies per edit in the planted-copy table")
    ap.add_argument("--skip-planted", action="store_true")
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"threads: torch {args.threads}, faiss {args.threads}; cpu count {os.cpu_count()}; "
          f"load average at start {load_avg()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    import faiss
    import torch

    from privacy.embeddings import (
        EncoderConfig,
        PixelSpace,
        load_encoder,
        save_encoder,
        train_encoder,
        training_data_id,
    )
    from privacy.memorization import check_memorization
    from privacy.memorization_config import MemorizationConfig
    from privacy.search import brute_force_nearest, exact_nearest
    from synth.data.canonical import load_dataset
    from synth.data.ingest import ingest
    from synth.data.locate import data_dir
    from tests.planted import run_planted

    real_dir = ingest(data_dir() / "pneumoniamnist.npz", tmp / "pneumonia")
    real = load_dataset(real_dir)
    train_real = real.split("train")[0]
    holdout_real = np.concatenate([real.split("val")[0], real.split("test")[0]])

    if args.encoder:
        encoder = load_encoder(args.encoder)
        enc_note = f"loaded from {args.encoder}"
    else:
        t0 = time.perf_counter()
        encoder = train_encoder(train_real, EncoderConfig(), data_hash=training_data_id(real.content_hash))
        enc_note = (f"trained here: {EncoderConfig().steps} steps, {time.perf_counter() - t0:.1f} s "
                    f"(1 torch thread), on {len(train_real)} images")
        if args.save_encoder:
            save_encoder(encoder, args.save_encoder, overwrite=True)
    print(f"encoder: {enc_note}", flush=True)

    config = MemorizationConfig()
    holdout = image_set(holdout_real, "hold")
    synthetic = image_set(tile(holdout_real, args.synthetic, seed=1), "syn")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, main_result, main_n = [], None, 60_000 if 60_000 in sizes else sizes[0]
    for n in sizes:
        train = image_set(tile(train_real, n, seed=0), "train")
        print(f"check: {n} train × {len(synthetic)} synthetic (load {load_avg()})", flush=True)
        t0 = time.perf_counter()
        result = check_memorization(train, holdout, synthetic, encoder=encoder, config=config)
        total = time.perf_counter() - t0
        timings = result.summary["timings"]

        def seconds(space: str, key: str, timings=timings) -> float:
            # The reference (train + holdout) part plus every synthetic shard's part.
            parts = [timings["reference"].get(space, {}), *(s.get(space, {}) for s in timings["shards"])]
            return sum(float(p.get(key, 0.0)) for p in parts)

        rows.append({
            "n": n, "total": total,
            "pixel_embed": seconds("pixel", "embed_seconds"), "pixel_search": seconds("pixel", "search_seconds"),
            "learned_embed": seconds("learned", "embed_seconds"),
            "learned_search": seconds("learned", "search_seconds"),
            "registered": seconds("registered", "seconds"),
            "flagged": result.summary["flagged_fraction"],
        })
        if n == main_n:
            main_result = (train, result)
        del train

    train, result = main_result
    also = None
    if args.also_threads:
        torch.set_num_threads(args.also_threads)
        faiss.omp_set_num_threads(args.also_threads)
        print(f"check again with {args.also_threads} threads (load {load_avg()})", flush=True)
        t0 = time.perf_counter()
        check_memorization(train, holdout, synthetic, encoder=encoder, config=config)
        also = time.perf_counter() - t0
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    # faiss exact vs numpy brute force on the pixel embeddings of the main size
    pixel = PixelSpace()
    t_emb, s_emb = pixel.embed(train.images), pixel.embed(synthetic.images)
    t0 = time.perf_counter()
    d_faiss, i_faiss = exact_nearest(t_emb, [s_emb])
    t_faiss = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_np, i_np = brute_force_nearest(t_emb, s_emb)
    t_np = time.perf_counter() - t0
    same = float(np.mean((i_faiss == i_np) | (np.abs(d_faiss - d_np) < 1e-4)))

    print(f"\nload average at end of timing {load_avg()}\n")
    print(f"### Memorization check, {len(synthetic)} synthetic images at 28×28, {args.threads} threads\n")
    print("| train images | whole check (s) | pixel embed | pixel search | learned embed (+mirror) | learned search "
          "| registration | flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | **{r['total']:.1f}** | {r['pixel_embed']:.1f} | {r['pixel_search']:.1f} | "
              f"{r['learned_embed']:.1f} | {r['learned_search']:.1f} | {r['registered']:.1f} | {r['flagged']:.3%} |")
    if also is not None:
        print(f"\nthe {main_n:,} check again with {args.also_threads} threads (torch and faiss): {also:.1f} s")
    print(f"\n### Exact nearest neighbour, pixel space ({len(train.images):,} × {len(synthetic)}, 784-d)\n")
    print("| method | seconds | agreement with the other |")
    print("|---|---|---|")
    print(f"| faiss IndexFlatIP (exact) | {t_faiss:.2f} | {same:.4f} |")
    print(f"| numpy matmul + argmax (chunks of 2048) | {t_np:.2f} | {same:.4f} |")
    print(f"\nencoder: {enc_note}")
    print(f"thresholds at {main_n:,}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.summary["thresholds"].items()))

    if not args.skip_planted:
        t0 = time.perf_counter()
        planted = run_planted(real_dir, encoder=encoder, config=config, per_transform=args.planted)
        print(f"\n### Planted copies (PneumoniaMNIST; {planted.setup['per_transform']} copies of training images per "
              f"edit; clean = {planted.clean_images} real holdout images, 2-fold cross-fitted; "
              f"{time.perf_counter() - t0:.1f} s)\n")
        print(planted.markdown())
        for f in planted.setup["folds"]:
            print(f"- calibrate on {f['calibration_split']} ({f['calibration_images']}), judge {f['clean_split']} "
                  f"({f['clean_images']}): false flags {f['false_flag_rate']:.4f} "
                  f"(expected ≤ {f['expected_false_flag_rate']:.4f})")
        by_split = run_planted(real_dir, encoder=encoder, config=config, per_transform=20,
                               transforms=["exact"], folds=[("val", "test"), ("test", "val")])
        for f in by_split.setup["folds"]:
            print(f"- by split: calibrate on {f['calibration_split']}, judge {f['clean_split']}: false flags "
                  f"{f['false_flag_rate']:.4f} ({f['clean_images']} images)")
    print(f"\nload average at the end {load_avg()}")


if __name__ == "__main__":
    main()
