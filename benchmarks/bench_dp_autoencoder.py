"""Reconstruction error of the latent generator's autoencoder with DP-SGD at several ε vs without DP: what
`dp.autoencoder_share` (privacy/dp_config.py `AUTOENCODER_SHARE`) is chosen from.

Trains the `small` autoencoder (synth.autoencoder.train_vae, 3 levels 16/32/64, 4 latent channels) on the real
HAM10000 64×64 RGB train split (N = 6961, δ = 1e-5) for the same number of steps and batch with and without DP
(DP: the release's strategy, privacy.dp.make_strategy, calibrated to each ε for those steps), then measures the
reconstruction MSE (on [-1, 1]) and PSNR of the held-out validation images and the latent std (the DP route fixes
scale 1, so ~1 is what the UNet wants). Print a Markdown table.

    .venv/bin/python benchmarks/bench_dp_autoencoder.py [--steps 60] [--batch 64] [--eps 1 2 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/ham10000_64.npz")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    ap.add_argument("--val", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from privacy.dp import make_strategy
    from privacy.dp_config import DPConfig
    from synth.autoencoder import encode_means, train_vae
    from synth.autoencoder_config import AUTOENCODER_PRESETS, AutoencoderConfig

    torch.set_num_threads(args.threads)
    with np.load(args.data) as npz:
        train = torch.from_numpy(npz["train_images"]).permute(0, 3, 1, 2).contiguous()
        val = torch.from_numpy(npz["val_images"][: args.val]).permute(0, 3, 1, 2).contiguous()
    cfg = AutoencoderConfig(**{**AUTOENCODER_PRESETS["small"], "batch_size": args.batch, "max_steps": args.steps,
                               "max_minutes": None})
    rows = []
    for eps in [None, *args.eps]:
        strategy = None if eps is None else make_strategy(DPConfig(target_epsilon=eps), dataset_size=len(train))
        started = time.monotonic()
        vae, _ = train_vae(train, cfg, seed=0, device=torch.device("cpu"), privacy=strategy)
        seconds = time.monotonic() - started
        with torch.no_grad():
            x = val.float().div(127.5).sub(1)
            means = encode_means(vae, val)
            mse = float((vae.decode(means).sample - x).pow(2).mean())
        rows.append({"eps": eps, "sigma": None if strategy is None else strategy.noise_multiplier, "mse": mse,
                     "psnr": 10 * math.log10(4 / mse), "latent_std": float(means.std()), "s": seconds})
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"| autoencoder ε | σ | val MSE ([-1, 1]) | PSNR dB | latent std "
          f"| s ({args.steps} steps, batch {args.batch}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eps = "no DP" if r["eps"] is None else r["eps"]
        sigma = "" if r["sigma"] is None else f"{r['sigma']:.2f}"
        print(f"| {eps} | {sigma} | {r['mse']:.4f} | {r['psnr']:.1f} | {r['latent_std']:.2f} | {r['s']:.0f} |")


if __name__ == "__main__":
    main()
