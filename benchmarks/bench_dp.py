"""Per-training-example cost of DP-SGD vs non-private training, for each correct grad-sample mode.

One training step as synth.training does it: B examples, each repeated K times with its own noise and timestep,
per-row MSE, `loss.mean().backward()`, then (DP) the noise-multiplicity fold and the DP optimizer's clip + noise.
The non-private baseline runs the same step on the same rows without Opacus. Ratios are within one run.

Modes: `hooks` (synthgate's per-sample hooks, `privacy.grad_sample.use_fast_grad_samples`: no discarded batch
weight gradients, grouped-convolution Conv2d sampler, K draws averaged as the per-example gradients are computed,
per-example gradient buffers reused across steps),
`hooks_opacus` (the previous default: Opacus' hooks with the grouped-convolution Conv2d sampler on maps of 14×14
and up), `hooks_unfold` (Opacus' stock unfold Conv2d sampler + the contiguity guard, required for correctness),
`functorch`, and `ghost` (+ guard; K=1 only, with a per-example loss criterion: ghost clipping cannot fold K draws
into one example, so the trainer cannot use it; shown for reference).

    .venv/bin/python benchmarks/bench_dp.py [--presets tiny small] [--ks 1 4] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _step_data(torch, cfg, batch: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1
    y = torch.randint(0, cfg.num_conditions, (batch,), generator=g)
    xr, yr = x.repeat_interleave(k, 0), y.repeat_interleave(k)
    noise = torch.randn(xr.shape, generator=g)
    t = torch.randint(0, 1000, (batch * k,), generator=g)
    return xr + noise, yr, t, noise  # noised input (schedule is irrelevant to cost), labels, timesteps, target


def _time_interleaved(steps: dict, *, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each step; rounds interleave the modes so load drift hits them alike.

    The process' CPU time is the steadier measure on shared cores: waiting for a core does not count in it.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {
        name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)) for name, ts in times.items()
    }


# Bench mode → DPConfig.grad_sample_mode.
_DP_MODE = {"hooks_opacus": "hooks"}
_LABELS = {
    "hooks": "hooks (synthgate hooks)",
    "hooks_opacus": "hooks (Opacus hooks + grouped conv)",
    "hooks_unfold": "hooks (unfold)+guard",
    "ghost": "ghost+guard",
}


def make_step(torch, cfg, *, mode: str, batch: int, k: int):
    """A closure running one training step in `mode` ("none" = non-private)."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from privacy.dp import DPConfig, make_strategy
    from privacy.grad_sample import install_contiguity_guard
    from synth.model import build_unet

    torch.manual_seed(0)
    model = build_unet(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    xin, y, t, target = _step_data(torch, cfg, batch, k, seed=1)
    # A stand-in training set of 10 batches: only its size matters here (σ calibration, expected batch size).
    n = 10 * batch
    loader = DataLoader(TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long)), batch_size=batch)

    if mode == "none":

        def step():
            pred = model(xin, t, class_labels=y).sample
            ((pred - target) ** 2).mean(dim=(1, 2, 3)).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    elif mode in ("hooks", "hooks_opacus", "hooks_unfold", "functorch"):
        import privacy.dp
        from privacy import grad_sample

        strategy = make_strategy(
            DPConfig(target_epsilon=8.0, grad_sample_mode=_DP_MODE.get(mode, mode)), dataset_size=n,
            noise_multiplicity=k,
        )
        if mode == "hooks_opacus":
            # Keep Opacus' hooks even where privacy.dp installs synthgate's (it falls back on False).
            saved = getattr(privacy.dp, "use_fast_grad_samples", None)
            privacy.dp.use_fast_grad_samples = lambda *_a, **_k: False
            try:
                dp_model, dp_opt, _ = strategy.attach(model, optimizer, loader, epochs=1)
            finally:
                if saved is None:
                    del privacy.dp.use_fast_grad_samples
                else:
                    privacy.dp.use_fast_grad_samples = saved
        else:
            dp_model, dp_opt, _ = strategy.attach(model, optimizer, loader, epochs=1)
        # A no-op where privacy.dp already installed them with the same K.
        if mode == "hooks" and not grad_sample.use_fast_grad_samples(dp_model, noise_multiplicity=k):
            raise RuntimeError("synthgate's per-sample hooks do not support this model")
        # The previous default sent maps under 14×14 to Opacus' unfold sampler.
        min_pixels = 196 if mode == "hooks_opacus" else grad_sample.GROUPED_CONV_MIN_PIXELS

        def step():
            default_pixels, grad_sample.GROUPED_CONV_MIN_PIXELS = grad_sample.GROUPED_CONV_MIN_PIXELS, min_pixels
            try:
                pred = dp_model(xin, t, class_labels=y).sample
                ((pred - target) ** 2).mean(dim=(1, 2, 3)).mean().backward()
                strategy.after_backward(dp_model, batch)
                dp_opt.step()
                dp_opt.zero_grad()
            finally:
                grad_sample.GROUPED_CONV_MIN_PIXELS = default_pixels

    elif mode == "ghost":
        if k != 1:
            raise ValueError("ghost clipping cannot fold noise multiplicity")
        from opacus import PrivacyEngine

        class PerExampleMSE(nn.Module):
            reduction = "mean"

            def forward(self, pred, tgt):
                per_example = ((pred - tgt) ** 2).flatten(1).mean(1)
                return per_example if self.reduction == "none" else per_example.mean()

        install_contiguity_guard(model)
        engine = PrivacyEngine()
        dp_model, dp_opt, criterion, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            criterion=PerExampleMSE(),
            grad_sample_mode="ghost",
        )

        def step():
            pred = dp_model(xin, t, class_labels=y).sample
            criterion(pred, target).backward()
            dp_opt.step()
            dp_opt.zero_grad()

    else:
        raise ValueError(mode)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--sample-size", type=int, default=28)
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4])
    p.add_argument("--modes", nargs="+", default=["hooks", "hooks_opacus", "hooks_unfold", "functorch", "ghost"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from synth.model import preset

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    for name in args.presets:
        cfg = preset(name, sample_size=args.sample_size)
        for k in args.ks:
            steps = {"non-private": make_step(torch, cfg, mode="none", batch=args.batch, k=k)}
            for mode in args.modes:
                if mode == "ghost" and k != 1:
                    continue
                steps[_LABELS.get(mode, mode)] = make_step(torch, cfg, mode=mode, batch=args.batch, k=k)
            secs = _time_interleaved(steps, warmup=args.warmup, repeats=args.repeats)
            for label, sec in secs.items():
                rows.append((name, k, label, sec, secs["non-private"]))
            print(f"[{name} K={k} done, {time.perf_counter() - t_start:.0f}s]", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    print(
        f"\nDP-SGD cost per training example: batch {args.batch}, {args.sample_size}×{args.sample_size}, "
        f"torch threads {args.threads}, median of {args.repeats} interleaved steps after {args.warmup} warm-up "
        "(wall clock, and process CPU time); "
        f"torch {torch.__version__}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs).\n"
    )
    print("| preset | K | mode | ms / step | ms / example | × non-private (same K) | CPU ms / example | × (CPU time) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, mode, (sec, cpu), (base, base_cpu) in rows:
        print(
            f"| {name} | {k} | {mode} | {sec * 1e3:.0f} | {sec * 1e3 / args.batch:.2f} | {sec / base:.2f} "
            f"| {cpu * 1e3 / args.batch:.2f} | {cpu / base_cpu:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
