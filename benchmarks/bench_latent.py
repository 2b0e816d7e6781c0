"""Per-step training cost by image size and generator kind: what `train.kind: auto` and the presets are based on.

For each size (28 px grayscale, 64 px RGB, 128 px grayscale) it times, on random data of that shape (the cost does
not depend on pixel values), with the preset's batch size:
- the pixel-space UNet of the preset (one optimizer step: per-row loss, backward, AdamW),
- the latent route: one autoencoder training step (synth.autoencoder: encode, sample, decode, MSE + KL, AdamW) and
  one latent UNet step on the autoencoder's latents (the preset's network for the latent size),
- decoding a batch of latents (what sampling adds per image, once, after the last denoising step).
Each number is the median of `--repeats` steps after one warm-up step. Print a Markdown table.

    .venv/bin/python benchmarks/bench_latent.py [--preset small] [--sizes 28 64 128] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {28: 1, 64: 3, 128: 1}  # channels: the datasets at those sizes (PneumoniaMNIST, HAM10000, Kermany)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unet_step(torch, model_cfg, train_cfg, batch: int, latent: bool):
    """A closure running one UNet optimizer step on random inputs of the model's shape."""
    from synth.diffusion_loss import make_scheduler, per_row_loss
    from synth.model import build_unet

    unet = build_unet(model_cfg).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = make_scheduler(train_cfg, latent=latent)
    x = torch.randn(batch, model_cfg.channels, model_cfg.sample_size, model_cfg.sample_size)
    y = torch.randint(0, model_cfg.num_conditions, (batch,))
    gen = torch.Generator().manual_seed(0)

    def step():
        rows = per_row_loss(unet, sched, x, y, null_condition=model_cfg.null_condition, generator=gen)
        rows.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in unet.parameters())


def vae_step(torch, ae_cfg, channels: int, size: int):
    from synth.autoencoder import build_vae

    vae = build_vae(ae_cfg, channels=channels, sample_size=size).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    x = torch.rand(ae_cfg.batch_size, channels, size, size) * 2 - 1

    def step():
        post = vae.encode(x).latent_dist
        loss = (vae.decode(post.sample()).sample - x).pow(2).mean() + ae_cfg.kl_weight * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def decode():
        with torch.no_grad():
            vae.decode(torch.randn(64, ae_cfg.latent_channels, size // ae_cfg.factor, size // ae_cfg.factor))

    return step, decode, sum(p.numel() for p in vae.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-pixel-above", type=int, default=128, help="skip pixel UNets above this size")
    args = parser.parse_args()

    import torch

    from synth.model import preset as model_preset
    from synth.train_config import TrainConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TrainConfig(preset=args.preset)
    ae = cfg.autoencoder
    print(f"preset {args.preset}, UNet batch {cfg.batch_size}, autoencoder batch {ae.batch_size}, "
          f"factor {ae.factor}, {args.threads} threads, torch {torch.__version__}")
    print("| size | pixel UNet s/step (params) | autoencoder s/step (params) | latent | latent UNet s/step (params) "
          "| decode 64 latents s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        ch = SHAPES.get(size, 1)
        pixel = "skipped"
        if size <= args.skip_pixel_above:
            m = model_preset(args.preset, sample_size=size, channels=ch, num_conditions=2)
            fn, n = unet_step(torch, m, cfg, cfg.batch_size, latent=False)
            pixel = f"{_median_time(fn, args.repeats):.2f} ({n / 1e6:.2f}M)"
        try:
            side = ae.latent_size(size)
            m = model_preset(args.preset, sample_size=side, channels=ae.latent_channels, num_conditions=2)
        except ValueError as e:  # e.g. 28 px at factor 4: 7-px latents, below the UNet's minimum
            print(f"| {size}×{size}×{ch} | {pixel} | n/a | n/a ({str(e).splitlines()[0][:60]}) | n/a | n/a |")
            continue
        step, decode, n_ae = vae_step(torch, ae, ch, size)
        ae_s = _median_time(step, args.repeats)
        dec_s = _median_time(decode, 1)
        fn, n = unet_step(torch, m, cfg, cfg.batch_size, latent=True)
        lat_s = _median_time(fn, args.repeats)
        print(f"| {size}×{size}×{ch} | {pixel} | {ae_s:.2f} ({n_ae / 1e6:.2f}M) | {ae.latent_channels}×{side}×{side} "
              f"| {lat_s:.2f} ({n / 1e6:.2f}M) | {dec_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
