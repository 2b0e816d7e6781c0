"""Training throughput of a preset on this machine, and what fraction of its measured fp32 matmul peak it reaches.

Times the trainer's own step (`synth.training.per_row_loss` → `loss.mean().backward()` → grad clip → AdamW →
EMA update) on random images of the preset's shape (the cost does not depend on pixel values), counts the step's
FLOPs with `torch.utils.flop_counter.FlopCounterMode`, and times a square fp32 GEMM in the same run as the peak.
With `--dataset`, also runs the full `synth.training.train` for `--steps` steps (data loading, EMA, bookkeeping
included) and reports its steps/min from the model card.

    .venv/bin/python benchmarks/bench_training.py [--preset small] [--batch-size 64] [--steps 10] [--threads 2]
                                                  [--noise-multiplicity 1] [--dataset DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_peak_gflops(torch, n: int = 1024, repeats: int = 8) -> float:
    """Best-of GFLOP/s of an n×n fp32 matmul (2n³ FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_flops_per_example(torch, unet, scheduler, model_cfg, k: int) -> float:
    """FLOPs of forward + backward of one example (K rows), counted on a batch of 4."""
    from torch.utils.flop_counter import FlopCounterMode

    from synth.training import per_row_loss

    x = torch.rand(4, model_cfg.channels, model_cfg.sample_size, model_cfg.sample_size) * 2 - 1
    y = torch.randint(0, model_cfg.num_conditions, (4,))
    with FlopCounterMode(display=False) as counter:
        rows = per_row_loss(unet, scheduler, x, y, null_condition=model_cfg.null_condition,
                            generator=torch.Generator().manual_seed(0), noise_multiplicity=k)
        rows.mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 4


def time_steps(torch, unet, scheduler, model_cfg, config, *, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` trainer steps (after `warmup` untimed ones)."""
    from diffusers.training_utils import EMAModel

    from synth.training import per_row_loss

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power)
    g = torch.Generator().manual_seed(0)
    b = config.batch_size
    x = torch.rand(b, model_cfg.channels, model_cfg.sample_size, model_cfg.sample_size, generator=g) * 2 - 1
    y = torch.randint(0, model_cfg.num_conditions, (b,), generator=g)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        rows = per_row_loss(unet, scheduler, x, y, null_condition=model_cfg.null_condition, generator=g,
                            noise_multiplicity=config.noise_multiplicity, cfg_dropout=config.cfg_dropout)
        rows.mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def full_train_rate(dataset: Path, config) -> tuple[float, int, float]:
    """(steps per minute, steps, seconds) of `synth.training.train` on `dataset` for `config`."""
    from synth.artifacts import read_header
    from synth.training import train

    with tempfile.TemporaryDirectory() as tmp:
        out = train(dataset, Path(tmp) / "model", config, progress=False)
        card = read_header(out, "model_card.json", kind="model")
    return 60 * card["steps"] / card["training_seconds"], card["steps"], card["training_seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "quality", "base"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--noise-multiplicity", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dataset", type=Path, default=None, help="also time synth.training.train on this dataset")
    args = parser.parse_args(argv)

    import torch

    from synth.model import build_unet, preset
    from synth.train_config import TrainConfig
    from synth.training import make_scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    config = TrainConfig(preset=args.preset, noise_multiplicity=args.noise_multiplicity, device="cpu",
                         max_steps=args.steps, max_minutes=None, checkpoint_every=None, **overrides)
    model_cfg = preset(args.preset, num_conditions=2)
    torch.manual_seed(0)
    unet = build_unet(model_cfg).train()
    scheduler = make_scheduler(config)
    params = sum(p.numel() for p in unet.parameters())

    load_before = os.getloadavg()[0]
    peak = matmul_peak_gflops(torch)
    flops = step_flops_per_example(torch, unet, scheduler, model_cfg, config.noise_multiplicity)
    times = time_steps(torch, unet, scheduler, model_cfg, config, steps=args.steps, warmup=args.warmup)
    peak = max(peak, matmul_peak_gflops(torch))  # once more after the steps, in case load changed
    load_after = os.getloadavg()[0]

    median = statistics.median(times)
    per_s = config.batch_size / median
    achieved = flops * per_s / 1e9
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} → {load_after:.1f} (other processes share these cores)\n")
    print("| preset | params | batch | K | GFLOP/example (fwd+bwd) | s/step (median) | steps/min | examples/s "
          "| achieved GFLOP/s | matmul peak GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {params / 1e6:.2f}M | {config.batch_size} | {config.noise_multiplicity} "
          f"| {flops / 1e9:.3f} | {median:.3f} | {60 / median:.0f} | {per_s:.1f} | {achieved:.1f} | {peak:.1f} "
          f"| {100 * achieved / peak:.1f}% |")
    print(f"\nstep times (s): min {min(times):.3f}, median {median:.3f}, max {max(times):.3f} over {len(times)} steps")
    if args.dataset is not None:
        rate, steps, seconds = full_train_rate(args.dataset, config)
        print(f"synth.training.train on {args.dataset}: {steps} steps in {seconds:.1f} s = {rate:.1f} steps/min")


if __name__ == "__main__":
    main()
