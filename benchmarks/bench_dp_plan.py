"""What DP-SGD batch size to spend a fixed compute budget on (the measurements behind `privacy/dp_plan.py`).

For each ε and candidate batch B at a fixed budget of E example-draws (T = E/B steps), on the real PneumoniaMNIST
train split: σ from Opacus' accountant (the strategy's own calibration), then a short DP training run and, on the
real validation split with fixed noise and timesteps, the EMA model's denoising loss with the true class and with
the null condition. `class gap` = null − true: how much the model uses the class (≈ 0 when DP noise drowned it,
the failure of issue 15). CPU seconds are the process' (steadier than wall time on shared cores). Also the
per-example gradient norms at initialisation (the clipping norm's rationale).

    .venv/bin/python benchmarks/bench_dp_plan.py --preset tiny --budget 12800 --eps 1 10 --batches 64 256 512
    .venv/bin/python benchmarks/bench_dp_plan.py --sigma-table
    .venv/bin/python benchmarks/bench_dp_plan.py --eps 10 --batches 64 \
        --public ../shared/data/covid_cxr_128.npz ../shared/data/ham10000_64.npz \
        ../shared/data/ham10000_64.npz+../shared/data/covid_cxr_128.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def val_losses(model_dir: Path, dataset: Path, *, draws: int = 4, seed: int = 0) -> tuple[float, float]:
    """EMA model's mean denoising MSE on the val split: (true class, null condition), same noise for both."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from synth.data.canonical import load_dataset

    images, meta = load_dataset(dataset).split("val")
    x = torch.from_numpy(images).float().div(127.5).sub(1)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = torch.from_numpy(meta["label"].to_numpy()).long()
    unet = UNet2DModel.from_pretrained(model_dir / "unet_ema").eval()
    sched = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    null = unet.config.num_class_embeds - 1
    g = torch.Generator().manual_seed(seed)
    x, y = x.repeat_interleave(draws, 0), y.repeat_interleave(draws)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    noisy = sched.add_noise(x, noise, t)
    out = []
    with torch.no_grad():
        for labels in (y, torch.full_like(y, null)):
            losses = [(unet(noisy[i:i + 256], t[i:i + 256], class_labels=labels[i:i + 256]).sample
                       - noise[i:i + 256]).pow(2).mean(dim=(1, 2, 3)) for i in range(0, len(x), 256)]
            out.append(float(torch.cat(losses).mean()))
    return out[0], out[1]


def grad_norms(dataset: Path, preset: str, n: int = 64) -> list[float]:
    """Per-example gradient norms of the training loss at initialisation (K=1, one draw each)."""
    import torch

    from synth.diffusion_loss import make_scheduler, per_row_loss
    from synth.model import build_unet
    from synth.train_config import TrainConfig
    from synth.train_data import load_training_data, model_config_for

    data = load_training_data(dataset, ())
    cfg = TrainConfig(preset=preset, condition_attributes=())
    unet = build_unet(model_config_for(data, preset, where_=dataset))
    sched = make_scheduler(cfg)
    g = torch.Generator().manual_seed(0)
    norms = []
    for i in range(n):
        img = data.images[i:i + 1].float().div(127.5).sub(1)
        unet.zero_grad()
        loss = per_row_loss(unet, sched, img, data.conditions[i:i + 1], null_condition=data.space.num_conditions,
                            generator=g).mean()
        loss.backward()
        norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in unet.parameters() if p.grad is not None))))
    return sorted(norms)


def dp_run(args: argparse.Namespace, dataset: Path, work: Path, n: int, delta: float, eps: float, batch: int,
           start: str, init: Path | None) -> dict:
    """One short (DP) training run at `args.budget` example-draws from `init`, scored on val."""
    from privacy.dp import build_strategy, calibrate_noise_multiplier
    from privacy.dp_config import DPConfig
    from synth.train_config import TrainConfig
    from synth.training import train

    steps = args.budget // batch
    sigma = calibrate_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=1 / (n // batch),
                                       steps=steps, accountant="prv") if eps else 0.0
    cfg = TrainConfig(preset=args.preset, batch_size=batch, max_steps=steps, max_minutes=None,
                      lr_warmup_steps=max(1, min(10, steps // 10)), condition_attributes=(),
                      threads=args.threads, checkpoint_every=None, init_from=str(init) if init else None)
    # ε 0: the non-private reference (same budget, batch and schedule).
    dp = DPConfig(epsilon=eps, max_physical_batch_size=min(batch, 64)) if eps else None
    out = work / f"m-{start}-{eps}-{batch}"
    wall, cpu = time.perf_counter(), time.process_time()
    train(dataset, out, cfg, privacy=build_strategy(dp, dataset=dataset, noise_multiplicity=1) if dp else None,
          progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    true, null = val_losses(out, dataset)
    return {"start": start, "epsilon": eps, "batch": batch, "steps": steps, "sigma": round(sigma, 3),
            "noise_per_mean": round(sigma / batch, 5), "val_loss": round(true, 4),
            "class_gap": round(null - true, 5), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from privacy.dp import default_delta
    from synth.data.ingest import ingest
    from synth.train_config import TrainConfig
    from synth.training import train

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-dp-plan-"))
    dataset = ingest(Path(args.data), work / "dataset")
    from synth.data.canonical import load_dataset

    private = load_dataset(dataset)
    n = private.split_size("train")
    delta = default_delta(n)
    norms = grad_norms(dataset, args.preset)
    print(json.dumps({"grad_norms_at_init": {"min": norms[0], "median": norms[len(norms) // 2], "max": norms[-1]}}),
          flush=True)
    starts = {"fresh": None}
    # public pretraining: a non-private model on each public set (a '+'-joined list is trained in that order, the
    # budget split between them), ingested at 28 px with the private set's channels, and every run from it
    channels = 3 if private.images.ndim == 4 else 1
    for spec in args.public or ():
        init = None
        paths = spec.split("+")
        for i, path in enumerate(paths):
            public = ingest(Path(path), work / f"public-{len(starts)}-{i}", size=28, channels=channels)
            init = train(public, work / f"public-model-{len(starts)}-{i}", TrainConfig(
                preset=args.preset, batch_size=64, max_steps=args.budget // 64 // len(paths), max_minutes=None,
                condition_attributes=(), threads=args.threads, checkpoint_every=None,
                init_from=str(init) if init else None), progress=False)
        starts["+".join(Path(x).stem for x in paths)] = init
    rows = []
    for start, init in starts.items():
        for eps in args.eps:
            for batch in args.batches:
                rows.append(dp_run(args, dataset, work, n, delta, eps, batch, start, init))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def sigma_table(n: int = 4708, delta: float = 1e-5) -> None:
    """σ (and σ/B) from Opacus' PRV calibration over a grid of batches and steps, at ε = 1 and 10 (no training)."""
    from privacy.dp import calibrate_noise_multiplier

    batches = (64, 128, 256, 512, 1024, 2048)
    for eps in (1.0, 10.0):
        print(f"\nε = {eps:g}, N = {n}, δ = {delta:g}: σ (σ/B)\n| steps | " + " | ".join(f"B={b}" for b in batches)
              + " |\n|---|" + "---|" * len(batches))
        for steps in (100, 200, 400, 800, 1600):
            cells = []
            for b in batches:
                s = calibrate_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=b / n, steps=steps,
                                               accountant="prv")
                cells.append(f"{s:.3g} ({s / b:.4f})")
            print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist.npz"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--budget", type=int, default=12800, help="example-draws per run (B × steps)")
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0], help="0: non-private reference")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--public", nargs="+", help="public starts beside 'fresh': each a public .npz, or several "
                   "joined by '+' (trained in turn, the budget split), pretrained non-privately with the same budget "
                   "at 28 px and the private set's channels; every run is repeated from each start")
    p.add_argument("--sigma-table", action="store_true", help="only the accountant's σ grid (seconds, no training)")
    args = p.parse_args()
    names = ["+".join(Path(x).stem for x in spec.split("+")) for spec in args.public or ()]
    if len(set(names)) != len(names):  # each start is a row key: a repeated one would overwrite the first
        p.error(f"--public names a start twice: {' '.join(args.public)}")
    if args.sigma_table:
        sigma_table()
        return
    rows = run(args)
    print("| start | ε | batch | steps | σ | σ/B | val loss (true class) | class gap | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {r['epsilon']:g} | {r['batch']} | {r['steps']} | {r['sigma']} | "
              f"{r['noise_per_mean']} | {r['val_loss']} | {r['class_gap']} | {r['cpu_s']} |")


if __name__ == "__main__":
    main()
