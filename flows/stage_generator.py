"""Stages of the generator: training (optionally DP, optionally with torchrun), the guidance scale's selection,
and generation of the synthetic set (sharded or not)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.release_config import ReleaseConfig
from flows.stage_runner import (
    GUIDANCE,
    MODEL,
    SYNTHETIC,
    artifact_hash,
    build_config,
    interactive,
    run_stage,
    shard_name,
)
from synth.errors import ConfigError


def train_stage(cfg: ReleaseConfig, dataset: Path) -> Path:
    """The generator. A crashed run resumes from its checkpoint (same config ⇒ same weights)."""
    from synth.training import train

    train_cfg = cfg.train.model_copy(update={"device": cfg.device})
    config = {"train": train_cfg.model_dump(mode="json"), "dp": cfg.dp.model_dump(mode="json")}
    inputs = {"dataset": artifact_hash(dataset)}
    if train_cfg.init_from is not None:  # the starting weights are an input: new public model, new training
        inputs["init_from"] = artifact_hash(Path(train_cfg.init_from))

    def build(out: Path) -> Path:
        nonlocal train_cfg
        ckpt = out.parent / f"{out.name}.ckpt"
        dp = cfg.dp.config() if cfg.dp.enabled else None
        if dp is not None:
            from privacy.dp_plan import apply_plan

            train_cfg, dp = apply_plan(dp, train_cfg, dataset=dataset)  # dp.plan auto: settings from the budget
        if cfg.launch.nproc > 1:
            from flows.distributed import launch_training

            return launch_training(dataset, out, train_cfg, nproc=cfg.launch.nproc, dp=dp,
                                   backend=cfg.launch.backend, resume=ckpt.exists(), checkpoint_dir=ckpt,
                                   progress=interactive())
        privacy = None
        if dp is not None:
            from privacy.dp import build_strategy

            privacy = build_strategy(dp, dataset=dataset, noise_multiplicity=train_cfg.noise_multiplicity)
        return train(dataset, out, train_cfg, privacy=privacy, resume=ckpt.exists(), checkpoint_dir=ckpt,
                     progress=interactive())

    return run_stage(cfg.workdir, MODEL, inputs=inputs, config=config, build=build)


def _generation_config(cfg: ReleaseConfig) -> dict[str, Any]:
    from synth.sampling import DEFAULT_SAMPLER

    return {**cfg.generate.model_dump(mode="json"), "sampler": cfg.generate.sampler or DEFAULT_SAMPLER}


def guidance_stage(cfg: ReleaseConfig, dataset: Path, model: Path) -> ReleaseConfig:
    """The config with its guidance scale and weights fixed: as given, or (`guidance_scale: auto`) chosen on the
    real validation split for the utility the gate judges (`reports/guidance.py`): the scale, and with `weights:
    auto` also which of the model's kept EMA snapshots or its final EMA weights generate."""
    g = cfg.generate
    if g.guidance_scale != "auto":
        return cfg.model_copy(update={"generate": g.model_copy(update={"weights": resolved_weights(g.weights)})})
    from reports.guidance import load_guidance, select_guidance

    selection = selection_config(cfg)
    sampler = _generation_config(cfg)["sampler"]
    offered = None if g.weights == "auto" else [g.weights]
    out = run_stage(
        cfg.workdir, GUIDANCE, inputs={"dataset": artifact_hash(dataset), "model": artifact_hash(model)},
        config={"selection": selection.model_dump(mode="json"), "sampler": sampler, "steps": g.steps,
                "batch_size": g.batch_size, "weights": g.weights},
        build=lambda out: select_guidance(dataset, model, out, sampler=sampler, steps=g.steps, config=selection,
                                          device=cfg.device, batch_size=g.batch_size, weights=offered,
                                          progress=print),
    )
    chosen = load_guidance(out)
    return cfg.model_copy(update={"generate": g.model_copy(update={"guidance_scale": chosen.guidance_scale,
                                                                   "weights": chosen.weights})})


def selection_config(cfg: ReleaseConfig) -> Any:
    """The release's `GuidanceSelectionConfig`: `generate.guidance_selection`, aimed at what the gate judges (its
    TRTS and ratio floors are the policy's `min_trts_balanced_accuracy` and `min_tstr_trtr_balanced_accuracy_ratio`
    unless the section sets `trts_floor` / `ratio_floor` itself)."""
    from reports.guidance import GuidanceSelectionConfig

    given = {"trts_floor": cfg.policy.min_trts_balanced_accuracy,
             "ratio_floor": cfg.policy.min_tstr_trtr_balanced_accuracy_ratio, **cfg.generate.guidance_selection}
    return build_config(GuidanceSelectionConfig, given, "generate.guidance_selection")


def resolved_weights(weights: str) -> str:
    """The weights generation uses when none were chosen on val: `auto` means the final EMA weights."""
    return "ema" if weights == "auto" else weights


def guidance_facts(cfg: ReleaseConfig) -> dict[str, Any] | None:
    """What the guidance selection tried and chose (None when the scale was given, not selected)."""
    from reports.guidance import load_guidance

    if cfg.generate.guidance_scale != "auto" or not (cfg.workdir / GUIDANCE).is_dir():
        return None
    return load_guidance(cfg.workdir / GUIDANCE).facts()


def generate_stage(cfg: ReleaseConfig, model: Path, *, shard_index: int = 0, shard_count: int = 1) -> Path:
    """The synthetic set (or one shard of it: images i with i % shard_count == shard_index), every image's seed
    recorded."""
    from synth.generate import generate

    g, config = cfg.generate, _generation_config(cfg)
    for name in ("guidance_scale", "weights"):
        if getattr(g, name) == "auto":
            raise ConfigError(f"generate.{name} is 'auto': pass the config returned by guidance_stage, which "
                              "holds the chosen scale and weights")
    name = SYNTHETIC if shard_count == 1 else shard_name(SYNTHETIC, shard_index, shard_count)
    return run_stage(
        cfg.workdir, name, inputs={"model": artifact_hash(model)},
        config={**config, "shard_index": shard_index, "shard_count": shard_count} if shard_count > 1 else config,
        build=lambda out: generate(
            model, out, n=None if g.per_class else g.n, per_class=g.per_class, balance=g.balance,
            sampler=config["sampler"],
            steps=g.steps, guidance_scale=g.guidance_scale, batch_size=g.batch_size, seed=g.seed, weights=g.weights,
            shard_index=shard_index, shard_count=shard_count, device=cfg.device,
            progress=interactive() and shard_count == 1,
        ),
    )


def merge_synthetic_stage(cfg: ReleaseConfig, model: Path, shards: Sequence[Path]) -> Path:
    """The synthetic set from its shards: byte-identical to the single-shard run with the same seed."""
    from synth.generate import merge_shards

    if len(shards) == 1 and Path(shards[0]).name == SYNTHETIC:
        return Path(shards[0])
    return run_stage(
        cfg.workdir, SYNTHETIC,
        inputs={"model": artifact_hash(model), **{f"shard{i}": artifact_hash(p) for i, p in enumerate(shards)}},
        config={**_generation_config(cfg), "merged_from": len(shards)},
        build=lambda out: merge_shards(list(shards), out),
    )
