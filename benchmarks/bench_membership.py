"""Membership-inference attacks (loss, PIA) on a deliberately overfitted model vs a normally trained one.

Two models are trained with `synth.training.train` on the real PneumoniaMNIST (or reused from `--work`):

    overfit  the `tiny` preset on a few class-balanced training images (default 32), batch 8, cosine schedule,
             400 passes over each image: memorises (the recipe of tests/test_membership.py, twice the images)
    normal   the `small` preset on the whole train split (4708 images) for `--normal-steps` steps: the CPU demo

Each is audited with `privacy.membership.membership_audit` (members: its train split; non-members: val + test,
stratified by condition) and one markdown table row per (model, attack) is printed: AUC and TPR@1%FPR with
bootstrap 95% CIs, TPR@0.1%FPR, the time of the attack. Expect AUC well above 0.5 for `overfit` and near 0.5 for
`normal` (100 steps of 64 are 1.4 epochs over 4708 images: little to detect).

One run (2 shared CPU cores, 1 thread, other jobs running; training 61 s + 56 s, audits 1.2 s + 28 s):

| model | setup | attack | members / non-members | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR | attack s |
|---|---|---|---|---|---|---|---|
| overfit | tiny, 32 imgs, 1600 steps | loss | 32 / 32 | 0.864 [0.770, 0.942] | 0.156 [0.062, 0.562] | 0.156 | 0.8 |
| overfit | tiny, 32 imgs, 1600 steps | pia | 32 / 32 | 0.363 [0.228, 0.494] | 0.000 [0.000, 0.031] | 0.000 | 0.1 |
| normal | small, 4708 imgs, 100 steps | loss | 256 / 256 | 0.485 [0.432, 0.536] | 0.012 [0.000, 0.043] | 0.004 | 23.9 |
| normal | small, 4708 imgs, 100 steps | pia | 256 / 256 | 0.491 [0.443, 0.541] | 0.004 [0.000, 0.016] | 0.000 | 4.0 |

With 32 (or 256) non-members TPR@1%FPR allows 0 (or 2) false positives and TPR@0.1%FPR none: rough at best.
PIA reads *below* 0.5 on the overfitted model (flagged as reversed): see privacy/membership.py.

    .venv/bin/python benchmarks/bench_membership.py [--work /tmp/bench_membership]
        [--overfit-images 32] [--overfit-steps 1600] [--normal-steps 100] [--n 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _slice(source: Path, out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A class-balanced random slice of a canonical dataset (per split: sizes[split] // classes of each class)."""
    import numpy as np

    from synth.data.canonical import load_dataset, write_dataset

    if out.exists():
        return out
    ds = load_dataset(source)
    meta = ds.metadata
    rng = np.random.default_rng(seed)
    rows: list[int] = []
    for split, n in sizes.items():
        for label in range(len(ds.class_names)):
            idx = np.flatnonzero(((meta["split"] == split) & (meta["label"] == label)).to_numpy())
            rows += rng.choice(idx, size=n // len(ds.class_names), replace=False).tolist()
    rows_arr = np.sort(np.asarray(rows))
    return write_dataset(
        out, np.asarray(ds.images[rows_arr]), meta.iloc[rows_arr].drop(columns="sha256").reset_index(drop=True),
        class_names=ds.class_names, source={**ds.header["source"], "slice_of": ds.content_hash, "sizes": sizes},
        license=ds.header["license"], attribution=ds.header["attribution"], inputs={"dataset": ds.content_hash},
    )


def _train(dataset: Path, out: Path, **config) -> tuple[Path, float]:
    from synth.train_config import TrainConfig
    from synth.training import train

    if out.exists():
        return out, float("nan")
    t0 = time.monotonic()
    train(dataset, out, TrainConfig(**config), progress=False)
    return out, time.monotonic() - t0


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", type=Path, default=None, help="pneumoniamnist.npz (default: SYNTHGATE_DATA_DIR or shared)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_membership"), help="datasets and models (reused)")
    p.add_argument("--overfit-images", type=int, default=32)
    p.add_argument("--overfit-steps", type=int, default=1600)
    p.add_argument("--normal-steps", type=int, default=100)
    p.add_argument("--n", type=int, default=256, help="members (and non-members) per audit")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from privacy.membership import membership_audit
    from privacy.membership_config import MembershipConfig
    from synth.data.ingest import ingest
    from synth.data.locate import data_dir

    torch.set_num_threads(args.threads)
    npz = args.npz or data_dir() / "pneumoniamnist.npz"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    full = work / "pneumonia"
    if not full.exists():
        ingest(npz, full)
    small_set = _slice(full, work / f"slice_{args.overfit_images}",
                       {"train": args.overfit_images, "val": 128, "test": 128})
    runs = {
        "overfit": (small_set, *_train(
            small_set, work / f"overfit_{args.overfit_images}_{args.overfit_steps}", preset="tiny",
            batch_size=8, lr=3e-3, max_steps=args.overfit_steps, max_minutes=None, checkpoint_every=None,
            ema_decay=0.9, beta_schedule="squaredcos_cap_v2",
        ), f"tiny, {args.overfit_images} imgs, {args.overfit_steps} steps"),
        "normal": (full, *_train(
            full, work / f"normal_small_{args.normal_steps}", preset="small", max_steps=args.normal_steps,
            max_minutes=None, checkpoint_every=None,
        ), f"small, 4708 imgs, {args.normal_steps} steps"),
    }
    config = MembershipConfig(n=args.n, bootstrap=args.bootstrap, device="cpu")
    print(f"torch threads {args.threads}; n={args.n} per side (capped by the data); bootstrap {args.bootstrap}\n")
    print("| model | setup | attack | members / non-members | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR "
          "| attack s |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for name, (dataset, model, train_s, setup) in runs.items():
        result = membership_audit(model, dataset, config=config)
        for attack, a in result.to_json()["attacks"].items():
            print(f"| {name} | {setup} | {attack} | {result.n_members} / {result.n_nonmembers} "
                  f"| {a['auc']:.3f} {_ci(a['auc_ci'])} | {a['tpr_at_1pct_fpr']:.3f} {_ci(a['tpr_at_1pct_fpr_ci'])} "
                  f"| {a['tpr_at_0_1pct_fpr']:.3f} | {a['seconds']:.1f} |")
        trained = "reused" if train_s != train_s else f"{train_s:.0f} s"
        notes.append(f"- {name}: training {trained}; audit {result.seconds:.1f} s; diagnostics "
                     + "; ".join(f"{k}: {v['diagnostics']}" for k, v in result.to_json()["attacks"].items()))
        notes.append(f"  note: {result.note}")
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
