"""Generation levers side by side on one trained model: class balance, guidance scale, EMA vs raw weights.

For each variant the same model generates a synthetic set (same seed, same sampler unless the variant changes it),
and the utility audit scores it against the same real set, so every row shares one TRTR (the TRTR job is
deterministic: same data, config and thread count) and differences come from the lever alone. Rows report what the
gate judges: TSTR balanced accuracy and its ratio to TRTR (paired bootstrap), the worst class's TSTR sensitivity
and its ratio to TRTR's, TRTS balanced accuracy; AUROC last, because it can look good while a class is dead.

    .venv/bin/python benchmarks/bench_utility_levers.py --real WORK/dataset --model WORK/model \\
        [--variants prior:1,uniform:1,uniform:1.5,uniform:2,uniform:3,uniform:1:raw] [--n 600] [--out DIR]

A variant is BALANCE:GUIDANCE[:WEIGHTS], WEIGHTS ema (default), raw or ema@STEP (a snapshot the model kept,
`train.snapshot_every`: each step's test score beside the one the release chose on val). Results: a Markdown
table on stdout and `levers.json` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_variant(text: str) -> tuple[str, float, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("prior", "uniform"):
        raise SystemExit(f"variant {text!r} is not BALANCE:GUIDANCE[:WEIGHTS] with BALANCE prior|uniform")
    weights = parts[2] if len(parts) == 3 else "ema"
    if weights not in ("ema", "raw") and not (weights.startswith("ema@") and weights[4:].isdigit()):
        raise SystemExit(f"variant {text!r}: weights must be ema, raw or ema@STEP (a kept EMA snapshot)")
    return parts[0], float(parts[1]), weights


def value(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    ci = m.get("ci")
    return f"{m['value']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{m['value']:.3f}"


def run_variant(real: Path, model: Path, work: Path, variant: tuple[str, float, str], *, n: int, seed: int,
                sampler: str, device: str) -> dict:
    from reports.utility import UtilityConfig, audit_utility
    from synth.generate import generate

    balance, guidance, weights = variant
    name = f"{balance}-g{guidance:g}-{weights.replace('@', '-')}"
    t = time.perf_counter()
    syn = generate(model, work / name, n=n, balance=balance, sampler=sampler, guidance_scale=guidance, seed=seed,
                   weights=weights, device=device, progress=False)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    out = audit_utility(real, syn, work / f"{name}-audit", config=UtilityConfig(ratios=(), fidelity=False))
    audit_s = time.perf_counter() - t
    body = json.loads((out / "utility.json").read_text())
    paired = body["tstr_vs_trtr"]
    return {
        "variant": name, "balance": balance, "guidance": guidance, "weights": weights,
        "per_class": body["data"]["synthetic"]["per_class"],
        "trtr_balanced_accuracy": body["trtr"]["balanced_accuracy"],
        "tstr_balanced_accuracy": body["tstr"]["balanced_accuracy"],
        "ba_ratio": paired["balanced_accuracy"]["ratio"],
        "trtr_worst": body["trtr"]["worst_class_sensitivity"], "trtr_worst_class": body["trtr"]["worst_class"],
        "tstr_worst": body["tstr"]["worst_class_sensitivity"], "tstr_worst_class": body["tstr"]["worst_class"],
        "worst_ratio": paired["worst_class_sensitivity"]["ratio"],
        "trts_balanced_accuracy": body["trts"]["balanced_accuracy"],
        "tstr_auroc": body["tstr"]["auroc"], "auroc_ratio": paired["auroc"]["ratio"],
        "seconds": {"generate": round(gen_s, 1), "audit": round(audit_s, 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, required=True, help="canonical real dataset (train/val/test)")
    ap.add_argument("--model", type=Path, required=True, help="trained model directory")
    ap.add_argument("--variants", default="prior:1,uniform:1,uniform:1.5,uniform:2,uniform:3,uniform:1:raw")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="sde-dpmsolver++-karras-12")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(",")]
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        rows = []
        for v in variants:
            rows.append(run_variant(args.real, args.model, Path(tmp), v, n=args.n, seed=args.seed,
                                    sampler=args.sampler, device=args.device))
            print(f"{rows[-1]['variant']}: TSTR BA {value(rows[-1]['tstr_balanced_accuracy'])}", file=sys.stderr)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("| variant | per class | TSTR bal. acc. | TSTR/TRTR bal. acc. | TSTR worst class | worst/TRTR worst | "
          "TRTS bal. acc. | TSTR AUROC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        counts = "/".join(str(c) for c in r["per_class"].values())
        print(f"| {r['variant']} | {counts} | {value(r['tstr_balanced_accuracy'])} | {value(r['ba_ratio'])} | "
              f"{value(r['tstr_worst'])} ({r['tstr_worst_class']}) | {value(r['worst_ratio'])} | "
              f"{value(r['trts_balanced_accuracy'])} | {value(r['tstr_auroc'])} |")
    trtr = rows[0]
    print(f"\nTRTR (same in every row): balanced accuracy {value(trtr['trtr_balanced_accuracy'])}, worst class "
          f"{value(trtr['trtr_worst'])} ({trtr['trtr_worst_class']})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "levers.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
