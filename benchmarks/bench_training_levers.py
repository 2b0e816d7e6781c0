"""Training levers side by side: each variant trains its own generator on one dataset, then every generator is
scored exactly as `bench_utility_levers.py` scores generation levers (uniform classes, same seed and sampler, the
same real test split and so the same TRTR), at each guidance scale asked for.

A variant is a named mapping of `TrainConfig` keys (preset, lr, max_steps, ...) in a YAML file, e.g.

    small-400:  {preset: small, max_steps: 400}
    tiny-940:   {preset: tiny, batch_size: 64, lr: 1.0e-3, lr_warmup_steps: 40, lr_schedule: cosine,
                 ema_decay: 0.999, class_balance: 1, max_steps: 940, max_minutes: 60, checkpoint_every: 100}

so a comparison per CPU-minute gives each variant the steps its network fits in the same time (`bench_training.py`
measures seconds per step per preset) and the table reports the training seconds each really took. Variants train
one after another on every core (or `--threads`), so nothing else should run beside the benchmark.

    .venv/bin/python benchmarks/bench_training_levers.py --real DATASET --variants VARIANTS.yaml --out DIR \\
        [--guidance 2,3] [--n 600] [--only NAME,...]

Models are kept in `DIR/models/NAME` and reused when present (a rerun only scores, or adds new variants). Results:
a Markdown table on stdout and `training_levers.json` in `DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utility_levers import run_variant, value


def train_variant(real: Path, models: Path, name: str, overrides: dict, *, threads: int | None) -> dict:
    """Train (or reuse) the variant's model; returns what the table reports about its training."""
    from synth.config import build
    from synth.train_config import TrainConfig
    from synth.training import train

    model = models / name
    if not (model / "model_card.json").exists():
        data = dict(overrides)
        if threads is not None:
            data.setdefault("threads", threads)
        config = build(TrainConfig, data, source=f"variant {name}")
        models.mkdir(parents=True, exist_ok=True)
        train(real, model, config, progress=False)
    card = json.loads((model / "model_card.json").read_text())
    return {"steps": card["steps"], "training_seconds": round(float(card["training_seconds"]), 1),
            "stopped_by": card.get("stopped_by"), "model": str(model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, required=True, help="canonical real dataset (train/val/test)")
    ap.add_argument("--variants", type=Path, required=True, help="YAML: name -> TrainConfig overrides")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--guidance", default="2,3")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="sde-dpmsolver++-karras-12")
    ap.add_argument("--threads", type=int, default=None, help="training threads (default: every core)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from synth.config import load_yaml

    variants: dict = load_yaml(args.variants)
    if args.only:
        missing = [n for n in args.only.split(",") if n not in variants]
        if missing:
            raise SystemExit(f"{args.variants}: no variant named {', '.join(missing)}")
        variants = {n: variants[n] for n in args.only.split(",")}
    scales = [float(g) for g in args.guidance.split(",")]
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    rows = []
    for name, overrides in variants.items():
        t = time.perf_counter()
        trained = train_variant(args.real, args.out / "models", name, overrides, threads=args.threads)
        print(f"{name}: {trained['steps']} steps, {trained['training_seconds']} s "
              f"({time.perf_counter() - t:.0f} s with set-up)", file=sys.stderr)
        for g in scales:
            row = run_variant(args.real, Path(trained["model"]), args.out / "scored" / name, ("uniform", g, "ema"),
                              n=args.n, seed=args.seed, sampler=args.sampler, device=args.device)
            rows.append({"name": name, "overrides": overrides, **trained, **row})
            print(f"{name} g{g:g}: ratio {value(row['ba_ratio'])}, TRTS {value(row['trts_balanced_accuracy'])}",
                  file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "training_levers.json").write_text(json.dumps(rows, indent=2))
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("| variant | steps | training s | guidance | TSTR bal. acc. | TSTR/TRTR bal. acc. | TSTR worst class | "
          "worst/TRTR worst | TRTS bal. acc. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r['training_seconds']:.0f} | {r['guidance']:g} | "
              f"{value(r['tstr_balanced_accuracy'])} | {value(r['ba_ratio'])} | "
              f"{value(r['tstr_worst'])} ({r['tstr_worst_class']}) | {value(r['worst_ratio'])} | "
              f"{value(r['trts_balanced_accuracy'])} |")
    first = rows[0]
    print(f"\nTRTR (same in every row): balanced accuracy {value(first['trtr_balanced_accuracy'])}, worst class "
          f"{value(first['trtr_worst'])} ({first['trtr_worst_class']})")


if __name__ == "__main__":
    main()
