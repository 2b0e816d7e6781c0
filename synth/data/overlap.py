"""Public pretraining data must not overlap the private data (`train.init_from_dataset`, `--public-dataset`, the
release's `public_pretraining:` stage): a private image in the "public" set would be trained
on without DP, and the DP guarantee (which covers the private set only) would not hold for it.

`check_disjoint` compares the per-image pixel sha256 that every canonical dataset carries (`metadata.parquet`),
over all splits of both sets (private val and test images are patients too). It catches the same images however
they were re-packed or re-split; it cannot catch the same source resampled differently (e.g. `kermany_cxr_128`
resized to 28 px is PneumoniaMNIST's source, but no pixel matches: benchmarks/README.md "Public pretraining").
The steward's licence/source declaration is the control for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synth.errors import InputError, where


def check_disjoint(public: Path, private: Path) -> dict[str, Any]:
    """Refuse (InputError naming the public set) when any image of `public` has the pixels of an image of
    `private`; else return what was checked (for the card and the release record)."""
    from synth.data.canonical import load_dataset

    pub, priv = load_dataset(public), load_dataset(private)
    pub_meta, priv_meta = pub.metadata, priv.metadata
    private_ids = dict(zip(priv_meta["sha256"], priv_meta["image_id"], strict=True))
    shared = pub_meta[pub_meta["sha256"].isin(private_ids.keys())]
    if len(shared):
        first = shared.iloc[0]
        raise InputError(where(
            public, f"{len(shared)} of its {len(pub_meta)} images have the pixels of private images (sha256), e.g. "
                    f"public {first['image_id']} = private {private_ids[first['sha256']]} in {private}: a public "
                    "pretraining set must not contain the private data"))
    return {
        "method": "pixel sha256 of every image, all splits of both datasets",
        "public_dataset": pub.content_hash,
        "private_dataset": priv.content_hash,
        "public_images": len(pub_meta),
        "private_images": len(priv_meta),
        "shared_images": 0,
    }
