"""The model directory a training run writes (and `synth.pipeline.load_pipeline` reads), written atomically:

    model_index.json                                   ConditionalDiffusionPipeline(unet, scheduler).save_pretrained
    pipeline.py                                        the standalone pipeline (synth/diffusers_pipeline.py, copied)
                                                       so plain diffusers loads the directory (see that module)
    unet/config.json, unet/diffusion_pytorch_model.safetensors           the raw (last-step) weights
    vae/config.json, vae/diffusion_pytorch_model.safetensors             latent generators only: the autoencoder
                                                       (its config holds the latents' scaling and shift factors)
    scheduler/scheduler_config.json                    the DDPMScheduler it was trained with (samplers derive from it)
    unet_ema/config.json, unet_ema/diffusion_pytorch_model.safetensors   the EMA weights (the ones to sample from)
    unet_ema_snapshots/step-NNNNNN/                    `train.snapshot_every` only: the EMA weights after NNNNNN
                                                       steps (a UNet folder each), for the release flow to choose
                                                       among on real val (reports/guidance.py)
    privacy_ledger.json                                DP runs only: the privacy strategy's `ledger()`
    model_card.json                                    artifact header, kind "model" (see `write_model_dir`);
                                                       schema and reader in `synth.model_card`
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synth import layout
from synth.artifacts import atomic_dir, write_header, write_json
from synth.conditioning import ConditionSpace
from synth.model import ModelConfig

MODEL_CARD = layout.MODEL_CARD
KIND = layout.MODEL_KIND
SCHEMA_VERSION = 1
LEDGER = layout.PRIVACY_LEDGER
EMA_DIR = layout.EMA_DIR
PIPELINE_FILE = layout.PIPELINE_FILE


def pipeline_source() -> bytes:
    """The standalone pipeline's source (`synth/diffusers_pipeline.py`): what every model directory's `pipeline.py`
    holds, byte for byte."""
    from synth import diffusers_pipeline

    return Path(diffusers_pipeline.__file__).read_bytes()


def payload_files(root: Path) -> list[str]:
    """Every file under `root` except the model card, as sorted POSIX relative paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MODEL_CARD)


def diffusers_usage() -> dict[str, str]:
    """The card's `diffusers` entry: how to load and sample the directory with plain diffusers (no synthgate).
    Exactly what tests/test_pipeline_diffusers.py runs; keep README.md's "Model directory" section in step."""
    load = ("DiffusionPipeline.from_pretrained(MODEL_DIR, custom_pipeline=str(MODEL_DIR), trust_remote_code=True, "
            "low_cpu_mem_usage=False, unet=UNet2DModel.from_pretrained(MODEL_DIR, subfolder='unet_ema', "
            "low_cpu_mem_usage=False))")
    return {
        "pipeline": PIPELINE_FILE,
        "load": load,
        "call": "pipe(class_labels=[...], num_inference_steps=50, guidance_scale=1.0, "
                "generator=[torch.Generator().manual_seed(s) for s in seeds]).images",
        "notes": (
            "diffusers >= 0.42, offline. trust_remote_code=True runs this directory's pipeline.py (torch and "
            "diffusers only; covered by this card's content hash). DiffusionPipeline.from_pretrained(MODEL_DIR) "
            "without custom_pipeline does not work: model_index.json names ConditionalDiffusionPipeline, which "
            "diffusers does not ship. Without unet=... the raw last-step weights in unet/ are used; synthgate "
            "samples from unet_ema/ by default. class label i is condition index i (see conditions). "
            "low_cpu_mem_usage=False avoids diffusers' warning when accelerate is not installed."
        ),
    }


def privacy_summary(*, epsilon: float, ledger: Mapping[str, Any], noise_multiplicity: int) -> dict[str, Any]:
    """The model card's `privacy` entry: ε, δ, K and what they mean, in plain words.

    One ε: the card states the ledger's ε when the ledger records one (`epsilon` is the fallback), so the number
    people read is the number the ledger check recomputes; the gate blocks a card that disagrees with its ledger.
    """
    epsilon = float(ledger.get("epsilon", epsilon))
    delta = ledger.get("delta")
    accountant = ledger.get("accountant")
    clip = ledger.get("max_grad_norm")
    plan = ledger.get("dp_plan")
    public = ledger.get("public_pretraining")
    explanation = (
        f"Trained with differentially private SGD (DP-SGD): each step used a random (Poisson) subset of the "
        f"training images, clipped each image's gradient to norm {clip} and added Gaussian noise. The result is "
        f"(ε={epsilon:.3g}, δ={delta:.2g})-differentially private with respect to any single training image: "
        f"whether or not one image was in the training set changes the probability of any outcome of training — "
        f"this model and anything generated from it — by at most a factor e^ε ≈ {_exp(epsilon)}, except with "
        f"probability at most δ. ε was computed with the {accountant} accountant. Each image was used with "
        f"K={noise_multiplicity} noise/timestep draw(s) per step; its K gradients were averaged before clipping, "
        "so K does not weaken the guarantee. The guarantee is per image, not per patient: a patient with several "
        "images is protected less."
    )
    if public:
        explanation += (
            f" The guarantee covers this model's private training images only: training started from the public "
            f"model {public.get('content_hash', '')[:12]}… (weights {public.get('weights')}), trained on public data "
            f"(licence: {public.get('data_license')}; source: {public.get('data_source') or 'not declared'}), which "
            "the guarantee does not cover and which is not protected by it."
        )
    return {
        "epsilon": float(epsilon),
        "delta": delta,
        "accountant": accountant,
        "max_grad_norm": clip,
        "noise_multiplicity": int(noise_multiplicity),
        "steps": ledger.get("steps"),
        "ledger": LEDGER,
        "explanation": explanation,
        "plan": plan,
        "public_pretraining": public,
    }


def _exp(epsilon: float) -> str:
    import math

    return f"{math.exp(epsilon):.3g}" if epsilon < 50 else "(astronomically large)"


def write_model_dir(
    out: Path,
    *,
    unet: Any,
    ema_unet: Any,
    scheduler: Any,
    model_config: ModelConfig,
    train_config: Mapping[str, Any],
    space: ConditionSpace,
    dataset_hash: str,
    image: Mapping[str, int],
    condition_counts: Sequence[int],
    privacy: Mapping[str, Any] | None = None,
    privacy_ledger: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    init_from: Mapping[str, Any] | None = None,
    vae: Any = None,
    generator: Mapping[str, Any] | None = None,
    snapshots: Mapping[int, Path] | None = None,
) -> Path:
    """Write the model directory atomically to `out` and return `out`.

    `unet`/`ema_unet` are `UNet2DModel`s (saved from the CPU), `scheduler` the training `DDPMScheduler`,
    `train_config` the `TrainConfig.to_json()`. The card's body holds `conditions` (ConditionSpace JSON),
    `class_names`, `image` (height, width, channels), `condition_counts` (training images per condition index),
    `weights` (which folder holds which weights), `generator` (kind pixel, or latent with its `vae` folder,
    latent shape and scaling; `vae` is then the `AutoencoderKL`), `snapshots` (step → a saved UNet folder of the
    EMA weights at that step, copied to `unet_ema_snapshots/`; listed in `weights`), `privacy` (None or
    `privacy_summary(...)`), `diffusers` (how to load it without synthgate: `diffusers_usage()`), `init_from`
    (None, or the model training started from: `synth.init_from.load_init`'s record; its content hash is also an
    input of the header) and `extra` (seeds, steps, epochs, time, device, losses ...).
    """
    from synth.pipeline import ConditionalDiffusionPipeline

    out = Path(out)
    with atomic_dir(out) as tmp:
        parts = {"vae": vae.to("cpu")} if vae is not None else {}
        ConditionalDiffusionPipeline(unet=unet.to("cpu"), scheduler=scheduler, **parts).save_pretrained(tmp)
        ema_unet.to("cpu").save_pretrained(tmp / EMA_DIR)
        weights: dict[str, Any] = {"ema": EMA_DIR, "raw": "unet", "default": "ema"}
        if snapshots:
            weights["snapshots"] = {}
            for step, folder in sorted(snapshots.items()):
                shutil.copytree(folder, tmp / layout.snapshot_dir(step))
                weights["snapshots"][str(int(step))] = layout.snapshot_dir(step)
        # Before the card, so the card's `files` and content hash cover the code that samples from the weights.
        (tmp / PIPELINE_FILE).write_bytes(pipeline_source())
        if privacy_ledger is not None:
            write_json(tmp / LEDGER, dict(privacy_ledger))
        body = {
            "conditions": space.to_json(),
            "class_names": list(space.class_names),
            "image": {**{k: int(image[k]) for k in ("height", "width", "channels")}, "dtype": "uint8"},
            "condition_counts": [int(c) for c in condition_counts],
            "weights": weights,
            "generator": dict(generator) if generator is not None else {"kind": "pixel"},
            "privacy": dict(privacy) if privacy is not None else None,
            "diffusers": diffusers_usage(),
            "init_from": dict(init_from) if init_from is not None else None,
            **dict(extra or {}),
        }
        write_header(
            tmp,
            MODEL_CARD,
            kind=KIND,
            schema_version=SCHEMA_VERSION,
            files=payload_files(tmp),
            inputs={"dataset": dataset_hash,
                    **({"init_from": str(init_from["content_hash"])} if init_from is not None else {})},
            config={"model": model_config.model_dump(mode="json"), "train": dict(train_config)},
            body=body,
        )
    return out
