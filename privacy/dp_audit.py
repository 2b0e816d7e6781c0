"""An empirical check of the DP claim: one extra DP training run with canaries (Steinke, Nasr & Jagielski 2023).

The accountant's ε is a theorem about DP-SGD; whether *this* code runs DP-SGD (noise really added, every example
really clipped, the sample rate the accountant assumes) is an empirical question. This audit answers it without
the hundreds of training runs classic auditing needs:

1. m canary images (uniform noise: far from any patient image, so each one is its own hard-to-guess example)
   each join the private train split independently with probability 1/2.
2. One training run with the release's DP code and settings (DP-SGD calibrated to `DPAuditConfig.epsilon`) on
   the private train split plus the included canaries.
3. Each canary is scored by the trained model's denoising loss on it (fixed noise draws; lower loss = more likely
   seen), and the audit guesses the lowest-loss canaries "in" and the highest "out".
4. `privacy.dp_bound` turns the number of correct guesses into an ε lower bound that holds with probability
   ≥ 1 - significance. If it exceeds the run's claimed ε, the implementation is broken and the release blocks.

Why at a small ε rather than the release's: with m canaries the audit cannot show more than about
log(m / log(1/α)) (~4.6 for m = 1000), so it could never catch a broken run that claims ε = 10; the mechanism
(code path, clipping, noise, sampling) is the same at every ε, and a bug that removes the noise shows at ε = 1.
The audit model and the canary-augmented copy of the train split live only in a temporary directory; the audit
artifact holds the canary scores, the guesses and the bound, never an image.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.dp_audit_config import DPAuditConfig
from privacy.dp_bound import GUESS_FRACTIONS, audit_scores, epsilon_ceiling
from synth.artifacts import atomic_dir, write_header, write_json
from synth.errors import ConfigError, where

DP_AUDIT_HEADER = "dp_audit.json"
DP_AUDIT_KIND = "dp_audit"
SCORES = "canary_scores.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Canaries:
    """The canary images (uint8, the dataset's image shape), their class labels and which ones were included."""

    images: np.ndarray
    labels: np.ndarray
    included: np.ndarray

    @classmethod
    def make(cls, m: int, *, shape: tuple[int, ...], num_classes: int, seed: int) -> Canaries:
        rng = np.random.default_rng(seed)
        return cls(
            images=rng.integers(0, 256, size=(m, *shape), dtype=np.uint8),
            labels=rng.integers(0, num_classes, size=m),
            included=rng.random(m) < 0.5,
        )


def with_canaries(dataset_dir: Path, out: Path, canaries: Canaries) -> Path:
    """A canonical dataset holding the train split of `dataset_dir` plus the included canaries (labels only: the
    audit run conditions on the class, as every canary has a class but no attributes)."""
    from synth.data.canonical import load_dataset, write_dataset

    ds = load_dataset(dataset_dir)
    images, meta = ds.split("train")
    if images.shape[1:] != canaries.images.shape[1:]:
        raise ConfigError(where(dataset_dir, f"images {images.shape[1:]} differ from the canaries' "
                                             f"{canaries.images.shape[1:]}"))
    kept = canaries.included
    rows = pd.concat(
        [
            meta[["image_id", "label"]].assign(split="train"),
            pd.DataFrame({"image_id": [f"canary-{i}" for i in np.flatnonzero(kept)], "label": canaries.labels[kept],
                          "split": "train"}),
        ],
        ignore_index=True,
    )
    return write_dataset(
        out, np.concatenate([np.asarray(images), canaries.images[kept]]), rows, class_names=ds.class_names,
        source={"kind": "dp-audit", "of": ds.content_hash}, license=str(ds.header.get("license", "unknown")),
    )


def canary_losses(model_dir: Path, canaries: Canaries, *, draws: int, seed: int, weights: str = "unet",
                  batch_size: int = 256) -> np.ndarray:
    """Each canary's mean denoising loss under the model (the same `draws` (t, noise) pairs for every canary's
    position, from `seed`). The raw last-step weights are scored: DP covers every iterate, and the last one
    carries the most recent steps' signal undiluted by the EMA."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(Path(model_dir) / weights, low_cpu_mem_usage=False).eval()
    scheduler = DDPMScheduler.from_pretrained(Path(model_dir) / "scheduler")
    x = torch.from_numpy(canaries.images).float().div(127.5).sub(1.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = torch.from_numpy(canaries.labels).long()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(x), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(draws):
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen)
            noise = torch.randn(x.shape, generator=gen)
            for s in range(0, len(x), batch_size):
                sl = slice(s, s + batch_size)
                pred = unet(scheduler.add_noise(x[sl], noise[sl], t[sl]), t[sl], class_labels=y[sl]).sample
                total[sl] += ((pred - noise[sl]) ** 2).mean(dim=(1, 2, 3)).double()
    return (total / draws).numpy()


def run_dp_audit(
    dataset_dir: Path,
    out: Path,
    *,
    train_config: Any,  # synth.train_config.TrainConfig: the release's
    dp_config: Any,  # privacy.dp_config.DPConfig: the release's
    config: DPAuditConfig = DPAuditConfig(),
    claimed: Mapping | None = None,
    strategy_factory: Callable[..., Any] | None = None,
) -> Path:
    """Train once with canaries and the release's DP code and settings (ε set to `config.epsilon`), score the
    canaries, and write the audit to `out`: a directory with `dp_audit.json` (the verdict) and
    `canary_scores.json`. Returns `out`.

    `claimed` (optional) is the release model's own ε/δ, recorded for the report. `strategy_factory` takes
    `make_strategy`'s arguments and defaults to it (tests pass a deliberately broken strategy)."""
    from privacy.dp import make_strategy
    from privacy.dp_config import DPConfig
    from synth.data.canonical import load_dataset
    from synth.training import train

    ds = load_dataset(dataset_dir)
    images, _ = ds.split("train")
    canaries = Canaries.make(config.canaries, shape=tuple(images.shape[1:]), num_classes=len(ds.class_names),
                             seed=config.seed)
    run_config = train_config.model_copy(update={"condition_attributes": ()})
    with tempfile.TemporaryDirectory(prefix="synthgate-dp-audit-") as tmp:
        augmented = with_canaries(dataset_dir, Path(tmp) / "dataset", canaries)
        n = int(len(images) + canaries.included.sum())
        audit_dp = DPConfig(**{**dp_config.to_dict(), "target_epsilon": config.epsilon})
        strategy = (strategy_factory or make_strategy)(audit_dp, dataset_size=n,
                                                       noise_multiplicity=run_config.noise_multiplicity)
        model = train(augmented, Path(tmp) / "model", run_config, privacy=strategy, progress=False)
        losses = canary_losses(model, canaries, draws=config.score_draws, seed=config.seed + 1)
        run_epsilon, run_delta = float(strategy.epsilon()), float(strategy.target_delta)
        sigma = float(strategy.noise_multiplier)
    best, every = audit_scores(-losses, canaries.included, delta=run_delta, significance=config.significance)
    ceiling = epsilon_ceiling(config.canaries, delta=run_delta, significance=config.significance)
    violated = best.epsilon_lower_bound > run_epsilon
    body = {
        "verdict": "violated" if violated else "consistent",
        "claimed_epsilon": run_epsilon,
        "delta": run_delta,
        "noise_multiplier": sigma,
        "epsilon_lower_bound": best.epsilon_lower_bound,
        "epsilon_ceiling": ceiling,
        "canaries": config.canaries,
        "included": int(canaries.included.sum()),
        "guesses": [asdict(g) for g in every],
        "best_guess": asdict(best),
        "release_claim": dict(claimed or {}),
        "explanation": _explain(violated, best.epsilon_lower_bound, run_epsilon, ceiling, config),
    }
    with atomic_dir(Path(out)) as tmp_out:
        write_json(tmp_out / SCORES, {"loss": losses.tolist(), "included": canaries.included.tolist(),
                                      "labels": canaries.labels.tolist()})
        write_header(tmp_out, DP_AUDIT_HEADER, kind=DP_AUDIT_KIND, schema_version=SCHEMA_VERSION, files=[SCORES],
                     inputs={"dataset": ds.content_hash},
                     config={"audit": config.model_dump(mode="json"), "train": run_config.to_json(),
                             "guess_fractions": list(GUESS_FRACTIONS)},
                     body=body)
    return Path(out)


def _explain(violated: bool, bound: float, claimed: float, ceiling: float, config: DPAuditConfig) -> str:
    if violated:
        return (f"The canary audit proves ε ≥ {bound:.2f} (at {1 - config.significance:.0%} confidence) for a run "
                f"whose accountant claims ε = {claimed:.2f}: the DP implementation does not deliver its claim.")
    return (f"The canary audit's lower bound ε ≥ {bound:.2f} is within the run's claimed ε = {claimed:.2f} "
            f"({config.canaries} canaries; the most this audit could show is ε ≈ {ceiling:.1f}).")


def read_dp_audit(root: Path) -> dict[str, Any]:
    """The header (`dp_audit.json`) of a canary audit directory, checked: one-line errors name the file."""
    from synth.artifacts import read_header
    from synth.errors import InputError

    header = read_header(Path(root), DP_AUDIT_HEADER, kind=DP_AUDIT_KIND)
    for key in ("epsilon_lower_bound", "claimed_epsilon", "epsilon_ceiling", "canaries", "verdict"):
        if key not in header:
            raise InputError(where(Path(root) / DP_AUDIT_HEADER, f"has no {key!r}"))
    return header
