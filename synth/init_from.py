"""Start training from another model's weights (`train.init_from`, `synthgate train --init-from MODEL_DIR`):
public-data pretraining, then (DP) fine-tuning on the private set.

The starting model must have been trained on images of the same height, width and channels, with the same UNet
(every `ModelConfig` field but the number of conditions); anything else is refused with one line. Its EMA weights
(the ones synthgate samples from) are loaded. Its class set may differ from the private one (a public set rarely
has the private labels): then every weight is loaded except the private class rows of the class embedding. The
null-condition row is the public model's (so unconditional sampling and guidance start from the pretrained
unconditional model); each private class keeps the fresh model's seeded random row. Distinct rows matter: with
every class row set to the public null row (the first design), 1600 DP steps at ε = 10 never separated them and the
release ignored its class condition (TRTS 0.48, benchmarks/README.md). The public model's own class rows stay at
the scale of a fresh N(0, 1) init (norm ≈ √dim), so fresh rows are inputs of the size its layers learnt to take.
What was loaded and what was re-initialised is recorded in the card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from synth.errors import InputError, where
from synth.model import ModelConfig

_EMBEDDING = "class_embedding.weight"


def load_init(unet: torch.nn.Module, model_dir: Path, *, model_cfg: ModelConfig, class_names: list[str],
              image: dict[str, int], dataset_hash: str, dataset: Path,
              public_dataset: Path | None = None, prediction_type: str = "epsilon") -> dict[str, Any]:
    """Load `model_dir`'s EMA weights into the fresh `unet` (built from `model_cfg` for the private `dataset`) and
    return the card's `init_from` record (the public model's content hash, its data's hash, licence and source,
    what was loaded, the overlap check). Refuses a model that was trained on this very dataset, or whose image
    shape, UNet or prediction type (epsilon or v) differ; with `public_dataset`, one that is not the model's data
    or shares an image with `dataset`."""
    from diffusers import UNet2DModel

    from synth.layout import EMA_DIR
    from synth.model_card import load_model_card

    model_dir = Path(model_dir)
    card = load_model_card(model_dir, require_weights=True)
    if card.trained_on == dataset_hash:
        raise InputError(where(model_dir, "was trained on this same dataset; --init-from needs a model trained on "
                                          "other (public) data"))
    overlap = _check_public_data(public_dataset, card.trained_on, dataset)
    theirs = {k: int((card.image or {}).get(k, -1)) for k in ("height", "width", "channels")}
    ours = {k: int(image[k]) for k in ("height", "width", "channels")}
    if theirs != ours:
        raise InputError(where(model_dir, f"was trained on {_shape(theirs)} images, this dataset has {_shape(ours)}; "
                                          "ingest the public set at the same size and channels"))
    their_cfg = dict(card.config.get("model") or {})
    mine = model_cfg.model_dump(mode="json")
    differing = sorted(k for k in mine if k != "num_conditions" and their_cfg.get(k) != mine[k])
    if differing:
        shown = ", ".join(f"{k} {their_cfg.get(k)!r} vs {mine[k]!r}" for k in differing)
        raise InputError(where(model_dir, f"has another UNet ({shown}); train with the same preset"))
    theirs_predict = (card.config.get("train") or {}).get("prediction_type", "epsilon")
    if theirs_predict != prediction_type:
        raise InputError(where(model_dir, f"was trained to predict {theirs_predict}, this run predicts "
                                          f"{prediction_type}; pretrain with the same train.prediction_type"))
    public = UNet2DModel.from_pretrained(model_dir / EMA_DIR, low_cpu_mem_usage=False)
    state = {k: v.detach().clone() for k, v in public.state_dict().items()}
    their_names = list(card.class_names or [])
    same_classes = their_names == list(class_names) and state[_EMBEDDING].shape == unet.state_dict()[_EMBEDDING].shape
    if same_classes:
        embedding = "loaded (same class names)"
    else:
        rows = unet.state_dict()[_EMBEDDING].detach().clone()  # the fresh, seeded init: distinct class rows
        rows[-1] = state[_EMBEDDING][-1]  # the public model's null (unconditional) condition
        state[_EMBEDDING] = rows
        embedding = (f"re-initialised: the public classes {their_names} differ from {list(class_names)}; the null "
                     "condition is the public null-condition row, each private condition a fresh random row")
    unet.load_state_dict(state, strict=True)
    return {
        "model_dir": str(model_dir),
        "content_hash": card.content_hash,
        "weights": EMA_DIR,
        "trained_on": card.trained_on,
        "data_license": card.extra("license"),
        "data_source": card.extra("attribution"),
        "public_class_names": their_names,
        "class_embedding": embedding,
        "steps": card.extra("steps"),
        "trained_with_dp": card.privacy is not None,
        "overlap_check": overlap,
    }


def _check_public_data(public: Path | None, trained_on: str | None, private: Path) -> dict[str, Any]:
    """The overlap check's record: run when the public dataset is given, else said not to have been run."""
    if public is None:
        return {"checked": False, "reason": "no public dataset given (init_from_dataset / --public-dataset)"}
    from synth.data.canonical import load_dataset_header
    from synth.data.overlap import check_disjoint

    if load_dataset_header(public).content_hash != trained_on:
        raise InputError(where(public, f"is not the dataset the init_from model was trained on ({trained_on})"))
    return {"checked": True, **check_disjoint(Path(public), Path(private))}


def _shape(image: dict[str, int]) -> str:
    return f"{image['height']}×{image['width']}×{image['channels']}"
