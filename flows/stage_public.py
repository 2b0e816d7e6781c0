"""Public-data pretraining as release stages (`public_pretraining:` in the release config), before training:

    public-dataset   the declared public set, ingested (cached on the source's identity and the ingest settings)
    (overlap check)  refused when any public image has the pixels of a private one (`synth.data.overlap`)
    public-model     a non-private model trained on it (cached on its content hash and the pretraining settings;
                     a crashed run resumes from its checkpoint)

`train_stage` then fine-tunes from the public model (`train.init_from`), with DP when `dp.enabled`; the public
model's content hash is an input of the training stage's cache key.
"""

from __future__ import annotations

from pathlib import Path

from flows.release_config import ReleaseConfig
from flows.stage_data import _source_identity
from flows.stage_runner import artifact_hash, interactive, run_stage

PUBLIC_DATASET, PUBLIC_MODEL = "public-dataset", "public-model"


def public_pretraining_stage(cfg: ReleaseConfig, private_dataset: Path) -> Path | None:
    """The public model to start training from (None without a `public_pretraining:` section)."""
    pre = cfg.public_pretraining
    if pre is None:
        return None
    from synth.data.ingest_config import ingest_with
    from synth.data.overlap import check_disjoint

    src = pre.ingest_config()
    public = run_stage(
        cfg.workdir, PUBLIC_DATASET, inputs={"source": _source_identity(src.path, src.csv)},
        config=src.model_dump(mode="json"), build=lambda out: ingest_with(src, out),
    )
    check_disjoint(public, private_dataset)  # pixel hashes only: milliseconds, so checked on every run
    train_cfg = pre.train.model_copy(update={"device": cfg.device})

    def build(out: Path) -> Path:
        from synth.training import train

        ckpt = out.parent / f"{out.name}.ckpt"
        return train(public, out, train_cfg, resume=ckpt.exists(), checkpoint_dir=ckpt, progress=interactive())

    return run_stage(cfg.workdir, PUBLIC_MODEL, inputs={"dataset": artifact_hash(public)},
                     config={"train": train_cfg.model_dump(mode="json")}, build=build)


def with_init_from(cfg: ReleaseConfig, model: Path | None) -> ReleaseConfig:
    """The config whose training starts from `model`, the public-model stage's output (unchanged when None); the
    trainer checks the public dataset beside it again and records the check in the model card."""
    if model is None:
        return cfg
    public = Path(model).parent / PUBLIC_DATASET
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"init_from": str(model), "init_from_dataset": str(public)})})
