"""Sampling throughput: images/s and network evaluations per sampler, `small` preset at 28×28.

    .venv/bin/python benchmarks/bench_sampling.py --n 16 --threads 1
    .venv/bin/python benchmarks/bench_sampling.py --model path/to/model --samplers ddim-25,sde-dpmsolver++-20

Counts UNet forward calls with a forward hook; "network evaluations" counts evaluated samples, so a classifier-free
guidance step (conditional + null rows in one call) costs 2 per image. Without `--model` the UNet is randomly
initialised: timings and counts do not depend on the weights. Prints a markdown table; speedups are relative to
the first sampler in the same run (run them together, the machine's load changes).
"""

from __future__ import annotations

import argparse
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="images per sampler (one batch)")
    parser.add_argument("--samplers",
                        default="ddpm-1000,ddim-50,sde-dpmsolver++-karras-12,sde-dpmsolver++-20,dpmsolver++-20")
    parser.add_argument("--guidance", default="1.0,3.0", help="guidance scales to measure (1.0 = no CFG)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="a model directory (default: random `small` UNet)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from diffusers import DDPMScheduler

    from synth.device import resolve_device
    from synth.model import build_unet, preset
    from synth.pipeline import ConditionalDiffusionPipeline, load_pipeline
    from synth.sampling import resolve_sampler

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.model:
        pipe = load_pipeline(args.model, device=device)
        arch = args.model
    else:
        torch.manual_seed(0)
        cfg = preset("small")
        pipe = ConditionalDiffusionPipeline(
            unet=build_unet(cfg), scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=True)
        ).to(device)
        pipe.unet.eval()
        arch = f"small@28 ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M params, random init)"
    pipe.set_progress_bar_config(disable=True)

    calls = {"calls": 0, "evals": 0}

    def count(module, inputs, output):
        calls["calls"] += 1
        calls["evals"] += int(inputs[0].shape[0])

    pipe.unet.register_forward_hook(count)
    conds = [i % 2 for i in range(args.n)]
    pipe.set_sampler("ddim-25")
    pipe(conds, num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up

    rows = []
    for name in args.samplers.split(","):
        for w in (float(g) for g in args.guidance.split(",")):
            cfg = resolve_sampler(name.strip(), guidance_scale=w)
            pipe.set_sampler(cfg)
            calls.update(calls=0, evals=0)
            gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
            start = time.perf_counter()
            pipe(conds, generator=gens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append((cfg.label, w, calls["calls"], calls["evals"] / args.n, seconds, args.n / seconds))
            print(f"  {cfg.label} w={w}: {seconds:.1f}s", flush=True)

    base = {w: ips for label, w, *_, ips in rows if label == rows[0][0]}
    print(f"\n{arch}; batch {args.n}; device {device}; torch threads {args.threads}; {platform.processor() or ''}")
    print("\n| sampler | guidance | UNet calls | network evals / image | seconds | images/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for label, w, n_calls, evals, seconds, ips in rows:
        ref = base.get(w)
        speedup = f"{ips / ref:.1f}×" if ref else "-"
        print(f"| {label} | {w:g} | {n_calls} | {evals:g} | {seconds:.1f} | {ips:.2f} | {speedup} |")


if __name__ == "__main__":
    main()
