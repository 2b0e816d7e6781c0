"""Reconstruction quality of the latent generator's autoencoder per minute of CPU: whole images against random
crops (`autoencoder.crop`), at the same wall-clock budget.

Trains the `quality` autoencoder (synth.autoencoder.train_vae, 3 levels 16/32/64, 4 latent channels, batch 32)
on a real train split for `--minutes` each way, then measures the reconstruction MSE (on [-1, 1]) and PSNR of
whole held-out validation images (the autoencoder is convolutional, so crops train the weights the whole image
uses). Prints a Markdown table. Run it pinned to one core with one thread for comparable rows.

    .venv/bin/python benchmarks/bench_autoencoder_crops.py --data ../shared/data/ham10000_64.npz \
        [--crops 0 32] [--minutes 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--crops", type=int, nargs="+", default=[0, 32], help="0: whole images")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--val", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--ceiling", type=Path, default=None,
                    help="a canonical dataset of the same images (WORK/dataset): also run bench_latent_ceiling on it")
    args = ap.parse_args()

    import numpy as np
    import torch
    from bench_latent_ceiling import ceiling

    from synth.autoencoder import heldout_reconstruction, train_vae
    from synth.autoencoder_config import AUTOENCODER_PRESETS, AutoencoderConfig

    torch.set_num_threads(args.threads)
    with np.load(args.data) as npz:
        train, val = npz["train_images"], npz["val_images"][: args.val]
    if train.ndim == 3:  # grayscale N×H×W
        train, val = train[..., None], val[..., None]
    train = torch.from_numpy(train).permute(0, 3, 1, 2).contiguous()
    val = torch.from_numpy(val).permute(0, 3, 1, 2).contiguous()
    rows = []
    for crop in args.crops:
        cfg = AutoencoderConfig(**{**AUTOENCODER_PRESETS["quality"], "max_steps": 1_000_000,
                                   "max_minutes": args.minutes, "crop": crop or None,
                                   "latent_channels": args.latent_channels})
        started = time.monotonic()
        vae, record = train_vae(train, cfg, seed=0, device=torch.device("cpu"))
        seconds = time.monotonic() - started
        held = heldout_reconstruction(vae, val)
        rows.append({"crop": crop or None, "steps": record["steps"], "mse": held["heldout_reconstruction_mse"],
                     "psnr": held["heldout_psnr_db"], "s": seconds})
        if args.ceiling is not None:
            row = ceiling(args.ceiling, vae)
            rows[-1].update({"tstr": row["tstr"], "trts": row["trts"], "trtr": row["trtr"]})
        print(rows[-1], file=sys.stderr, flush=True)
    side = int(train.shape[-1])
    print(f"| {args.data.name} ({side}×{side}×{int(train.shape[1])}), {args.latent_channels} latent channels "
          f"| steps (batch 32) in {args.minutes:g} min | val MSE ([-1, 1]) | val PSNR dB "
          "| reconstructions: TSTR / TRTS bal. acc. (TRTR) |")
    print("|---|---|---|---|---|")
    for r in rows:
        what = "whole images" if r["crop"] is None else f"{r['crop']}×{r['crop']} crops"
        ceil = f"{r['tstr']:.3f} / {r['trts']:.3f} ({r['trtr']:.3f})" if "tstr" in r else "–"
        print(f"| {what} | {r['steps']} | {r['mse']:.4f} | {r['psnr']:.1f} | {ceil} |")


if __name__ == "__main__":
    main()
