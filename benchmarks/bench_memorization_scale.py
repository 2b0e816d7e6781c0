"""Benchmark: the memorization search against training-set size, up to 1M embeddings.

What the audit's synthetic-shard search does per faiss space, timed alone (embedding and registration are not
counted; `bench_memorization.py` times the whole check): every synthetic query's k = 5 nearest training rows
(`privacy.search.search_base_shard`, queries in fixed blocks of 1024 as the shards search them), in

- the learned copy-detection embedding (128-d; two query views, each image and its mirror image), and
- pixel space (784-d, one view),

over training sets of 10k, 60k, 250k and 1M embeddings made by tiling the real PneumoniaMNIST training embeddings
(4,708) with small seeded jitter (each extra copy + Gaussian noise of norm `--jitter`, renormalised) so that tiles
are not exact ties. The 10k queries are the real holdout (val + test, 1,148 images) embeddings tiled the same way.

For each size: exact search (`faiss.knn`, no copy of the base), the index "auto" picks (exact up to 250k, IVF
beyond; IVF is also timed at 250k for comparison) with build and search times and IVF's recall@1 against exact on
a 1,000-query sample (the audit's measure: the nearest distance within 1e-4 of the exact one; plus how often IVF's
nearest is a tile of the same training image as exact's), and exact search over 4 base shards merged with
`merge_topk` at 1M (what a cluster does when the embeddings do not fit one machine), checked against the single
index.

    .venv/bin/python benchmarks/bench_memorization_scale.py [--threads 2] [--sizes 10000,60000,250000,1000000]
        [--queries 10000] [--spaces learned,pixel] [--encoder DIR] [--encoder-steps 1500] [--shards 4]

Memory: 1M×784 float32 is 3.1 GB; the IVF index holds a second copy while it exists (peak ~7 GB).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

K = 5  # candidates per query view, as the check's registration takes
BLOCK = 1024
RECALL_TOLERANCE = 1e-4


def load_avg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def tile(x: np.ndarray, n: int, *, jitter: float, seed: int, chunk: int = 65_536) -> np.ndarray:
    """`n` unit rows: `x` itself, then copies of its rows (cycling) plus Gaussian noise of expected norm `jitter`,
    renormalised. Built in chunks (no float64 temporaries of the whole matrix)."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    first = min(n, len(x))
    out[:first] = x[:first]
    sigma = np.float32(jitter / math.sqrt(d))
    for lo in range(first, n, chunk):
        hi = min(n, lo + chunk)
        block = x[np.arange(lo, hi) % len(x)] + sigma * rng.standard_normal((hi - lo, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo:hi] = block
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="10000,60000,250000,1000000")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--spaces", default="learned,pixel")
    ap.add_argument("--encoder", type=Path, default=None, help="a saved encoder (else one is trained here)")
    ap.add_argument("--encoder-steps", type=int, default=None, help="training steps (default: EncoderConfig's)")
    ap.add_argument("--shards", type=int, default=4, help="base shards for the sharded timing")
    ap.add_argument("--sharded-min", type=int, default=1_000_000, help="time base shards from this size up")
    ap.add_argument("--ivf-min", type=int, default=250_000, help="time IVF from this size up")
    ap.add_argument("--jitter", type=float, default=0.05)
    ap.add_argument("--recall-sample", type=int, default=1000)
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"threads: faiss {args.threads}, torch {args.threads}; cpu count {os.cpu_count()}; "
          f"load average at start {load_avg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-mem-scale-") as tmp:
        run(args, Path(tmp))


def embeddings(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, tuple[np.ndarray, list[np.ndarray]]], str]:
    """Per space: (training embeddings, holdout query views)."""
    from privacy.embeddings import EncoderConfig, PixelSpace, load_encoder, train_encoder, training_data_id
    from synth.data.canonical import load_dataset
    from synth.data.ingest import ingest
    from synth.data.locate import data_dir

    real = load_dataset(ingest(data_dir() / "pneumoniamnist.npz", tmp / "pneumonia"))
    train = np.asarray(real.split("train")[0])
    holdout = np.concatenate([real.split("val")[0], real.split("test")[0]])
    mirror = np.ascontiguousarray(holdout[:, :, ::-1])
    out: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    spaces = args.spaces.split(",")
    note = "no encoder (pixel space only)"
    if "learned" in spaces:
        if args.encoder:
            encoder, note = load_encoder(args.encoder), f"loaded from {args.encoder}"
        else:
            cfg = EncoderConfig() if args.encoder_steps is None else EncoderConfig(steps=args.encoder_steps)
            (encoder, secs) = timed(lambda: train_encoder(train, cfg, data_hash=training_data_id(real.content_hash)))
            note = f"trained here: {cfg.steps} steps, {secs:.0f} s at 1 torch thread"
        out["learned"] = (encoder.embed(train), [encoder.embed(holdout), encoder.embed(mirror)])
    if "pixel" in spaces:
        px = PixelSpace()
        out["pixel"] = (px.embed(train), [px.embed(holdout)])
    return {s: out[s] for s in spaces}, note


def exact_search(base: np.ndarray, views: list[np.ndarray], *, block: int | None):
    from privacy.search import SearchConfig, combine_views, search_base_shard

    return combine_views(*search_base_shard(base, 0, views, K, SearchConfig(index="exact", gpu="never"),
                                            block=block))


def run(args: argparse.Namespace, tmp: Path) -> None:
    from privacy.search import (
        SearchConfig,
        base_ranges,
        build_index,
        combine_views,
        merge_topk,
        recall_rows,
        search_base_shard,
    )

    spaces, enc_note = embeddings(args, tmp)
    print(f"encoder: {enc_note}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    auto = SearchConfig()
    rows: list[dict] = []
    block_check: list[str] = []
    for space, (train, views) in spaces.items():
        d = train.shape[1]
        queries = [tile(v, args.queries, jitter=args.jitter, seed=100 + i) for i, v in enumerate(views)]
        sample = recall_rows(args.queries, SearchConfig(recall_sample=args.recall_sample))
        for n in sizes:
            base = tile(train, n, jitter=args.jitter, seed=1)
            source = np.arange(n) % len(train)  # the training image each tile copies
            print(f"{space} ({d}-d, {len(views)} view(s)): {n:,} × {args.queries:,} (load {load_avg()})", flush=True)
            row: dict = {"space": space, "d": d, "views": len(views), "n": n}
            (ex_d, ex_r), row["exact"] = timed(lambda b=base, q=queries: exact_search(b, q, block=BLOCK))
            if n == 60_000:
                _, unblocked = timed(lambda b=base, q=queries: exact_search(b, q, block=None))
                block_check.append(f"{space}, 60,000: exact search in blocks of {BLOCK} {row['exact']:.1f} s, "
                                   f"in one call {unblocked:.1f} s")
            if n >= args.sharded_min:
                shard_cfg = SearchConfig(index="exact", gpu="never", base_shard_size=-(-n // args.shards))

                def sharded(b=base, cfg=shard_cfg, q=queries):
                    parts = [search_base_shard(b[lo:hi], lo, q, K, cfg, n_total=len(b), block=BLOCK)
                             for lo, hi in base_ranges(len(b), cfg)]
                    return combine_views(*merge_topk(parts, K))

                (sh_d, sh_r), row["sharded"] = timed(sharded)
                row["sharded_max_diff"] = float(np.max(np.abs(sh_d - ex_d)))  # last-bit float differences
                row["sharded_rows_same"] = float(np.mean(sh_r[:, 0] == ex_r[:, 0]))  # the rest: near-ties
                del sh_d, sh_r
            row["auto"] = auto.kind_for(n)
            if n >= args.ivf_min:
                ivf_cfg = SearchConfig(index="ivf", gpu="never")
                (index, info), row["ivf_build"] = timed(lambda b=base, c=ivf_cfg: build_index(b, c))
                (iv_d, iv_r), row["ivf_search"] = timed(
                    lambda ix=index, b=base, q=queries, c=ivf_cfg: combine_views(
                        *search_base_shard(b, 0, q, K, c, index=ix, block=BLOCK)))
                row["ivf_params"] = f"nlist {info['nlist']}, nprobe {info['nprobe']}"
                row["recall"] = float(np.mean(iv_d[sample, 0] <= ex_d[sample, 0] + RECALL_TOLERANCE))
                found = iv_r[sample, 0]
                row["same_source"] = float(np.mean((found >= 0) & (source[np.clip(found, 0, None)]
                                                                   == source[ex_r[sample, 0]])))
                del index, iv_d, iv_r
            rows.append(row)
            print(f"  {row}", flush=True)
            del base, ex_d, ex_r
            gc.collect()

    print(f"\nload average at the end {load_avg()}\n")
    print(f"### Memorization search vs training-set size ({args.queries:,} synthetic queries, k = {K}, "
          f"{args.threads} threads)\n")
    print("| space | train embeddings | exact (s) | auto picks | IVF build + search (s) | IVF recall@1 (audit) "
          f"| IVF same source | {args.shards} base shards, exact (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ivf = (f"{r['ivf_build']:.1f} + {r['ivf_search']:.1f} ({r['ivf_params']})" if "ivf_build" in r else "–")
        rec = f"{r['recall']:.3f}" if "recall" in r else "–"
        src = f"{r['same_source']:.3f}" if "same_source" in r else "–"
        sh = (f"{r['sharded']:.1f} (max Δd {r['sharded_max_diff']:.0e}, same nearest row "
              f"{r['sharded_rows_same']:.4f})" if "sharded" in r else "–")
        label = f"{r['space']} ({r['d']}-d, {r['views']} view{'s' if r['views'] > 1 else ''})"
        print(f"| {label} | {r['n']:,} | **{r['exact']:.1f}** | {r['auto']} | {ivf} | {rec} | {src} | {sh} |")
    print()
    for line in block_check:
        print(f"- {line}")
    print(f"- encoder: {enc_note}; jitter norm {args.jitter}; recall sample {args.recall_sample} queries")


if __name__ == "__main__":
    main()
