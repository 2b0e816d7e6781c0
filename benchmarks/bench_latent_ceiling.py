"""What a latent generator's autoencoder alone lets a synthetic set carry: the utility audit with the training
split's own reconstructions (encode → posterior mean → decode) as the "synthetic" set, beside the real TRTR.

A generator that decodes through this autoencoder cannot do better than its reconstructions of the real images:
"TSTR" here is train-on-reconstructions, test-on-real, so TSTR/TRTR well below 1 means the autoencoder, not the
UNet, is what loses the class signal. Prints the balanced-accuracy rows as Markdown.

    .venv/bin/python benchmarks/bench_latent_ceiling.py --real WORK/dataset --model WORK/model [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ceiling(real_dir: Path, vae: Any, *, n: int = 2000) -> dict[str, Any]:
    """Reconstruct up to n/k train images per class through `vae` and run the utility audit on them: PSNR and the
    TRTR, TSTR (train on reconstructions) and TRTS (test on reconstructions) balanced accuracies."""
    import numpy as np
    import pandas as pd
    import torch

    from reports.utility import UtilityConfig, audit_utility
    from synth.autoencoder import encode_means
    from synth.data.canonical import load_dataset, write_dataset

    real = load_dataset(real_dir)
    images, meta_train = real.split("train")
    labels = meta_train["label"].to_numpy()
    rng = np.random.default_rng(0)
    per = n // len(real.class_names)
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(len(real.class_names))])
    x = torch.from_numpy(images[pick])
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]
    with torch.no_grad():
        out = [vae.decode(encode_means(vae, x[i : i + 64])).sample.clamp(-1, 1).add(1).mul(127.5).round()
               .to(torch.uint8) for i in range(0, len(x), 64)]
    recon = torch.cat(out).permute(0, 2, 3, 1).numpy()
    if images.ndim == 3:
        recon = recon[..., 0]
    mse = float((((recon.astype(np.float32) - images[pick].astype(np.float32)) / 127.5) ** 2).mean())
    meta = pd.DataFrame({"image_id": [f"r{i}" for i in range(len(pick))], "split": "synthetic",
                         "label": labels[pick]})
    with tempfile.TemporaryDirectory() as tmp:
        syn = write_dataset(Path(tmp) / "recon", recon, meta, class_names=real.class_names,
                            source={"format": "reconstructions"})
        audit = audit_utility(real_dir, syn, Path(tmp) / "audit", config=UtilityConfig(ratios=(), fidelity=False))
        result = json.loads((audit / "utility.json").read_text())
    row = {"images": len(pick), "psnr": 10 * float(np.log10(4 / mse))}
    for key in ("trtr", "tstr", "trts"):
        row[key] = result[key]["balanced_accuracy"]["value"]
        row[f"{key}_worst"] = f"{result[key]['worst_class']} {result[key]['worst_class_sensitivity']['value']:.3f}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", type=Path, required=True, help="the release's canonical dataset (WORK/dataset)")
    ap.add_argument("--model", type=Path, required=True, help="a latent model directory (WORK/model)")
    ap.add_argument("--n", type=int, default=2000, help="train images to reconstruct (uniform over classes)")
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    row = ceiling(args.real, AutoencoderKL.from_pretrained(args.model / "vae").eval(), n=args.n)
    print(f"reconstructions of {row['images']} train images: PSNR {row['psnr']:.1f} dB")
    print("| protocol | balanced accuracy | worst class sensitivity |")
    print("|---|---|---|")
    for key, what in (("trtr", "TRTR (real → real test)"), ("tstr", "train on reconstructions → real test"),
                      ("trts", "real → reconstructions")):
        print(f"| {what} | {row[key]:.3f} | {row[key + '_worst']} |")


if __name__ == "__main__":
    main()
