"""A model directory loads and samples with plain diffusers (its `pipeline.py`), offline, quietly, and gives the
same pixels as synthgate's own pipeline for the same weights, scheduler, labels and seeds."""

from __future__ import annotations

import ast
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from synth.artifacts import content_hash, read_header
from synth.model_dir import pipeline_source
from synth.pipeline import load_pipeline
from synth.sampling import DEFAULT_SAMPLER
from tests.model_fixtures import make_model_dir

torch.set_num_threads(1)

LABELS = [0, 1, 1, 0]
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture
def offline(monkeypatch):
    """Any network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during a local load: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def load_plain(model_dir: Path, *, ema: bool = True):
    """The load the README and the model card document, word for word."""
    from diffusers import DiffusionPipeline, UNet2DModel

    extra = {}
    if ema:  # synthgate's default weights
        extra["unet"] = UNet2DModel.from_pretrained(model_dir, subfolder="unet_ema", low_cpu_mem_usage=False)
    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(model_dir), trust_remote_code=True,
                                             low_cpu_mem_usage=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(pil_images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pil_images])


def test_plain_diffusers_samples_what_synthgate_samples_with_the_trained_scheduler(model_dir, offline):
    pipe = load_plain(model_dir)
    assert type(pipe).__name__ == "ConditionalDiffusionPipeline" and type(pipe).__module__.startswith(
        "diffusers_modules")  # the directory's pipeline.py, not synthgate's class
    plain = pipe(class_labels=LABELS, num_inference_steps=4, guidance_scale=2.0, generator=_gens()).images
    assert len(plain) == 4 and plain[0].mode == "L" and plain[0].size == (28, 28)

    ours = load_pipeline(model_dir, weights="ema", device="cpu")(LABELS, num_inference_steps=4, guidance_scale=2.0,
                                                                generator=_gens())
    np.testing.assert_array_equal(_pixels(plain), ours)
    # np output: the same 8-bit pixels in [0, 1]
    as_np = pipe(class_labels=LABELS, num_inference_steps=4, guidance_scale=2.0, generator=_gens(), output_type="np")
    np.testing.assert_array_equal(np.round(as_np.images[..., 0] * 255).astype(np.uint8), ours)


def test_plain_diffusers_with_the_default_sampler_as_documented(model_dir, offline):
    from diffusers import DPMSolverMultistepScheduler

    pipe = load_plain(model_dir)
    # The README's recipe for synthgate's default sampler (sde-dpmsolver++-karras-12) in plain diffusers.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, thresholding=True,
        sample_max_value=1.0, timestep_spacing="trailing", variance_type=None)
    plain = pipe(class_labels=LABELS, num_inference_steps=12, guidance_scale=1.5, generator=_gens()).images

    ours = load_pipeline(model_dir, sampler=DEFAULT_SAMPLER, device="cpu")(LABELS, guidance_scale=1.5,
                                                                            generator=_gens())
    assert DEFAULT_SAMPLER == "sde-dpmsolver++-karras-12"  # else update the README recipe and this test
    np.testing.assert_array_equal(_pixels(plain), ours)


def test_without_unet_the_raw_weights_are_used(model_dir, offline):
    raw = load_plain(model_dir, ema=False)
    plain = raw(class_labels=LABELS, num_inference_steps=3, generator=_gens()).images
    ours = load_pipeline(model_dir, weights="raw", device="cpu")(LABELS, num_inference_steps=3, generator=_gens())
    np.testing.assert_array_equal(_pixels(plain), ours)


def test_plain_load_needs_custom_pipeline_and_trust_and_bad_labels_are_value_errors(model_dir, offline):
    from diffusers import DiffusionPipeline

    # Documented limits: diffusers does not ship the class model_index.json names, and runs local code only
    # when trusted.
    with pytest.raises(AttributeError, match="ConditionalDiffusionPipeline"):
        DiffusionPipeline.from_pretrained(model_dir, low_cpu_mem_usage=False)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(model_dir), low_cpu_mem_usage=False)
    pipe = load_plain(model_dir, ema=False)
    with pytest.raises(ValueError, match=r"class label 5 outside 0..2"):
        pipe(class_labels=[0, 5], num_inference_steps=1)
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=[0, 1], num_inference_steps=1, generator=_gens())


def test_documented_loads_print_no_accelerate_warning(model_dir, capfd):
    capfd.readouterr()
    load_plain(model_dir)
    load_pipeline(model_dir, device="cpu")
    err = capfd.readouterr().err
    assert "accelerate" not in err and "low_cpu_mem_usage" not in err


def test_pipeline_file_is_standalone_and_covered_by_the_model_hash(model_dir, tmp_path):
    card = read_header(model_dir, "model_card.json", kind="model")
    assert "pipeline.py" in card["files"]
    assert (model_dir / "pipeline.py").read_bytes() == pipeline_source()
    assert card["diffusers"]["pipeline"] == "pipeline.py" and "custom_pipeline" in card["diffusers"]["load"]

    imported = set()
    for node in ast.walk(ast.parse(pipeline_source())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "inspect", "collections", "typing", "torch", "diffusers"}, imported

    # Editing the code that samples from the weights changes the model's content hash.
    edited = make_model_dir(tmp_path / "model")
    before = content_hash(edited, card["files"])
    assert before == card["content_hash"]
    (edited / "pipeline.py").write_text((edited / "pipeline.py").read_text() + "\n# edited\n")
    assert content_hash(edited, card["files"]) != before
    assert json.loads((edited / "model_card.json").read_text())["content_hash"] == before
