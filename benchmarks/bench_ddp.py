"""Step time of multi-process training: 1 vs 2 gloo processes at the same global batch, with and without DP-SGD.

Each case runs `synth.training.train` under torchrun (`--standalone`, gloo) exactly as `flows.distributed` does, on
the real PneumoniaMNIST train split, with ONE torch thread per process (OMP_NUM_THREADS=1, `torch.set_num_threads`):
2 processes then use 2 cores where 1 process uses 1, which is what data parallelism buys. Rank 0 timestamps every
optimizer step (`on_step`, called after the step's all-reduce, so it is the whole group's step); the first
`--warmup` steps are left out and the median of the rest is reported. DP: Opacus DP-SGD (ε=10, rdp accountant,
K=1); with 2 processes it is Opacus' DistributedDPOptimizer (noise on rank 0, clipped sums all-reduced).

    .venv/bin/python benchmarks/bench_ddp.py [--presets tiny small] [--steps 30 12] [--warmup 5 3]
                                             [--dataset DIR] [--threads 1]

Prints a markdown table. The machine's other load shows in the numbers: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank: train `args.steps` steps, rank 0 writes its per-step timestamps to `args.result`."""
    import torch

    torch.set_num_threads(args.threads)
    from flows.distributed import process_group
    from synth.train_config import TrainConfig
    from synth.training import train

    config = TrainConfig(preset=args.preset, max_steps=args.steps, max_minutes=None, checkpoint_every=None,
                         device="cpu")
    stamps: list[float] = []
    with process_group("gloo"):
        rank = torch.distributed.get_rank()
        privacy = None
        if args.dp:
            from privacy.dp import DPConfig, build_strategy

            privacy = build_strategy(DPConfig(target_epsilon=10.0, accountant="rdp"), dataset=Path(args.dataset),
                                     noise_multiplicity=config.noise_multiplicity)
        out = Path(args.result).with_suffix(".model")
        train(Path(args.dataset), out, config, privacy=privacy, progress=False,
              on_step=lambda step, loss: stamps.append(time.perf_counter()))
    if rank == 0:
        Path(args.result).write_text(json.dumps({"stamps": stamps, "batch_size": config.batch_size}))


def run_case(dataset: Path, preset: str, *, nproc: int, dp: bool, steps: int, threads: int, tmp: Path) -> dict:
    result = tmp / f"{preset}-{nproc}-{'dp' if dp else 'plain'}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__).resolve()), "--worker", "--preset", preset, "--dataset", str(dataset),
           "--steps", str(steps), "--threads", str(threads), "--result", str(result), *(["--dp"] if dp else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:] + proc.stderr.splitlines()[-20:])
        raise SystemExit(f"{preset} nproc={nproc} dp={dp} failed:\n{tail}")
    data = json.loads(result.read_text())
    return {"stamps": data["stamps"], "batch_size": data["batch_size"], "wall_s": wall}


def median_step(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(gaps[warmup:] if len(gaps) > warmup else gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", nargs="+", type=int, default=[30, 12], help="steps per run, one per preset")
    ap.add_argument("--warmup", nargs="+", type=int, default=[5, 3], help="steps left out, one per preset")
    ap.add_argument("--dataset", type=Path, help="canonical dataset (default: PneumoniaMNIST, ingested)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    # worker mode (run by torchrun)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.steps = args.steps[0]
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp_name:
        tmp = Path(tmp_name)
        dataset = args.dataset
        if dataset is None:
            from synth.data.ingest import ingest
            from synth.data.locate import data_dir

            dataset = ingest(data_dir() / "pneumoniamnist.npz", tmp / "dataset")
        import torch

        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per process, "
              f"gloo; load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
        rows = []
        for i, preset in enumerate(args.presets):
            steps, warmup = args.steps[min(i, len(args.steps) - 1)], args.warmup[min(i, len(args.warmup) - 1)]
            for dp in (False, True):
                times = {}
                for nproc in (1, 2):
                    r = run_case(dataset, preset, nproc=nproc, dp=dp, steps=steps, threads=args.threads, tmp=tmp)
                    times[nproc] = median_step(r["stamps"], warmup)
                    batch = r["batch_size"]
                    print(f"  {preset} dp={dp} nproc={nproc}: {times[nproc]:.3f} s/step "
                          f"(run {r['wall_s']:.0f} s incl. startup)", file=sys.stderr)
                rows.append((preset, batch, dp, times[1], times[2]))
        print(f"load average after: {os.getloadavg()[0]:.2f}", file=sys.stderr)

    print("| preset | global batch | DP | 1 process (s/step) | 2 processes (s/step) | speed-up | "
          "2-proc examples/s |")
    print("|---|---|---|---|---|---|---|")
    for preset, batch, dp, one, two in rows:
        print(f"| {preset} | {batch} | {'yes' if dp else 'no'} | {one:.3f} | {two:.3f} | {one / two:.2f}× | "
              f"{batch / two:.0f} |")


if __name__ == "__main__":
    main()
