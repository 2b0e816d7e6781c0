"""Throughput of the mapped stages against Dask worker count: generation, the memorization search and the utility
classifiers, on a real `distributed.LocalCluster` with 1 and 2 worker processes (1 torch thread each).

The same plain functions the release flow's mapped tasks call are submitted to the cluster (no Prefect in the
timing): each stage is split into `--shards` shards, every shard's own compute time is recorded, and the table
shows wall time, throughput, speedup over 1 worker and the per-shard cost that predicts larger clusters:
wall(W) ≈ fixed + ceil(shards / W) · per-shard.

    python benchmarks/bench_scaleout.py [--model MODEL_DIR] [--n 256] [--shards 4] [--workers 1 2]

Without `--model`, a `tiny` model is trained for `--train-steps` steps on the real PneumoniaMNIST first.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


def _timed(fn, *args, **kwargs):
    """Run fn with torch pinned to 1 thread and return (result, seconds of compute on the worker)."""
    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _generate_shard(model: str, out: str, n: int, k: int, shards: int) -> float:
    from synth.generate import generate

    return _timed(generate, Path(model), Path(out), n=n, batch_size=32, seed=0, shard_index=k, shard_count=shards,
                  device="cpu", progress=False)[1]


def _search_shard(reference: str, synthetic: str, out: str, k: int, shards: int) -> float:
    from privacy.audit_sharding import search_synthetic_shard

    return _timed(search_synthetic_shard, Path(reference), Path(synthetic), Path(out), shard_index=k,
                  shard_count=shards)[1]


def _utility_job(real: str, synthetic: str, name: str, out: str, config: dict) -> float:
    from reports.utility import UtilityConfig, run_classifier_job

    return _timed(run_classifier_job, Path(real), Path(synthetic), name, Path(out),
                  config=UtilityConfig.model_validate(config))[1]


def _run_stage(client, fn, argsets) -> tuple[float, list[float]]:
    t = time.perf_counter()
    futures = [client.submit(fn, *args, pure=False) for args in argsets]
    per_task = client.gather(futures)
    return time.perf_counter() - t, per_task


def _prepare(args, tmp: Path) -> tuple[Path, Path, Path, Path]:
    """Real dataset, model, a synthetic set and the privacy reference (built once, outside the timings)."""
    from privacy.audit_config import PrivacyAuditConfig
    from privacy.audit_sharding import prepare_privacy_reference
    from synth.data.ingest import ingest
    from synth.data.locate import data_dir
    from synth.generate import generate
    from synth.train_config import TrainConfig
    from synth.training import train

    real = ingest(data_dir() / "pneumoniamnist.npz", tmp / "real")
    model = Path(args.model) if args.model else train(
        real, tmp / "model", TrainConfig(preset="tiny", max_steps=args.train_steps, batch_size=64, device="cpu"),
        progress=False)
    synthetic = generate(model, tmp / "synthetic", n=args.n, batch_size=32, seed=0, device="cpu", progress=False)
    reference = prepare_privacy_reference(real, tmp / "reference", config=PrivacyAuditConfig.model_validate(
        {"encoder": {"steps": 200}}))
    return real, model, synthetic, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model directory (default: train a tiny one)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--n", type=int, default=256, help="synthetic images generated / searched")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from reports.utility import UtilityConfig, plan_classifier_jobs

    utility_cfg = {"classifier": {"epochs": 2, "threads": 1, "min_steps": None}, "ratios": [1.0], "fidelity": False,
                   "n_boot": 50}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        real, model, synthetic, reference = _prepare(args, tmp)
        jobs = plan_classifier_jobs(real, synthetic, config=UtilityConfig.model_validate(utility_cfg))
        for w in args.workers:
            with LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                    Client(cluster) as client:
                client.run(lambda: __import__("torch").set_num_threads(1))
                runs = {
                    "generation": _run_stage(client, _generate_shard, [
                        (str(model), str(tmp / f"gen-{w}-{k}"), args.n, k, args.shards) for k in range(args.shards)]),
                    "memorization search": _run_stage(client, _search_shard, [
                        (str(reference), str(synthetic), str(tmp / f"mem-{w}-{k}"), k, args.shards)
                        for k in range(args.shards)]),
                    "utility classifiers": _run_stage(client, _utility_job, [
                        (str(real), str(synthetic), name, str(tmp / f"job-{w}-{name}"), utility_cfg)
                        for name in jobs]),
                }
            for stage, (wall, per_task) in runs.items():
                rows.append((stage, w, wall, per_task))

    base = {stage: wall for stage, w, wall, _ in rows if w == min(args.workers)}
    print(f"\n{args.n} synthetic images, {args.shards} shards (utility: {len(jobs)} classifier jobs); "
          f"1 torch thread per worker\n")
    print("| stage | workers | wall (s) | images/s | speedup | per-task s (median) | predicted wall for W=4 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage, w, wall, per_task in rows:
        tasks = len(per_task)
        per = statistics.median(per_task)
        fixed = max(wall - math.ceil(tasks / w) * per, 0.0)
        rate = f"{args.n / wall:.1f}" if stage != "utility classifiers" else "-"
        print(f"| {stage} | {w} | {wall:.1f} | {rate} | {base[stage] / wall:.2f}× | {per:.1f} | "
              f"{fixed + math.ceil(tasks / 4) * per:.1f} |")


if __name__ == "__main__":
    main()
