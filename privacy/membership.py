"""Membership inference on the trained diffusion model: can an attacker tell the images it trained on from real
images it never saw?

Members are a random subset of the real dataset's *train* split, what the model trained on (the model card's
`inputs.dataset` must equal the dataset's content hash: an audit against another dataset measures nothing).
Non-members are an equally large random subset of its holdout (val + test), minus holdout images whose pixels are
also in the train split (they are members in all but name). Both sides are drawn with the same number of images
per condition, so a different class mix between train and holdout cannot pass for a membership signal.

Both attacks are white-box, as strong as the release allows (the model weights are published with the card): they
query the noise predictor ε̂(x_t, t, y) of the weights generation uses (EMA by default) with the image's true
condition y (the model card's condition space applied to the image's metadata). A score is "higher = more likely a
member".

- `loss`: the denoising error ‖ε − ε̂(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, y)‖² (mean over pixels) averaged over fixed timesteps
  and K fixed noise draws: the training loss itself, the classic threshold attack (Yeom et al. 2018; for diffusion
  models Matsumoto et al. 2023, Carlini et al. 2023, who found small-to-medium t most revealing). Every image gets
  the same K noise tensors (common random numbers), so score differences come from the images, not from the draw.
  Score = −error. Defaults: t ∈ {50, 100, 200} of T=1000, K=4.
- `pia`: the Proximal Initialization Attack (Kong et al., ICLR 2024), its DDPM (ε-prediction) form. Instead of
  random noise it uses the model's own output at t=0 as the noise: ε₀ = ε̂(x₀, 0, y), x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε₀,
  and measures R_{t,p} = ‖ε̂(x_t, t, y) − ε₀‖_p (here normalised by the number of pixels, which does not change
  the ranking). A member's trajectory is the one the model was fitted to, so its two predictions agree better.
  Deterministic, two queries per image. Defaults t=200 of T=1000 and p=4, our reading of the paper's DDPM setting
  (both configurable). Observed on the CPU-budget models here: PIA's signal runs the *other* way (AUC < 0.5),
  more so at larger t (an overfitted tiny model: AUC 0.50 at t=10, 0.24 at t=200, 0.15 at t=400; loss attack 0.84).
  Their ε̂(x₀, 0) is far smaller than Gaussian noise (norm ≈ 11–13 vs ≈ 28 at 28×28) and smaller for members, so
  the x_t built from it is under-noised; the paper's models were trained for hundreds of thousands of steps. A
  reliably reversed attack is flagged (`diagnostics.reversed`, `note`) and `auc_any_direction` counts it as
  1 − AUC; the headline `auc` counts attacks in their published direction only.
  PIA was chosen over SecMI (Duan et al., ICML 2023), which needs a DDIM inversion to t and a reconstruction
  step (~t/interval queries per image), where the PIA paper reports competitive or better results from two
  queries: on two shared CPU cores the query count is what limits n.

Metrics per attack: ROC AUC (rank-based, ties count ½), TPR at 1% and 0.1% FPR (the largest TPR among thresholds
whose FPR is at most the target), each with a stratified bootstrap CI (members and non-members resampled
separately, seeded), and the ROC curve downsampled for a (log-scale) plot. TPR at a fixed FPR needs many
non-members: with n non-members only ⌊α·n⌋ false positives are allowed, so TPR@0.1%FPR below 1000 non-members is
the TPR at *zero* false positives, an extreme-value statistic that says little; the result's `note` says so.

Modules: the config `privacy.membership_config`, who is attacked `privacy.membership_sets`, the attacks' model
queries `privacy.membership_attacks`, the ROC/AUC metrics `privacy.roc`; here the results and the audit itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privacy.membership_attacks import loss_errors, pia_distances, to_model_input
from privacy.membership_config import HOLDOUT_SPLITS, MembershipConfig
from privacy.membership_sets import AuditSets, select_sets
from privacy.roc import FPR_TARGETS, bootstrap_metrics, downsample_roc, roc_auc, roc_curve, tpr_at_fpr
from synth.errors import ConfigError, InputError, where

# TPR@α is reported as unreliable when fewer than this many false positives are allowed (⌊α·n⌋).
MIN_FALSE_POSITIVES = 10

ATTACK_DESCRIPTIONS = {
    "loss": "denoising-loss threshold attack: −mean ‖ε − ε̂(x_t, t, y)‖² over fixed timesteps and fixed noise draws",
    "pia": "PIA (Kong et al., ICLR 2024): −‖ε̂(x_t, t, y) − ε̂(x_0, 0, y)‖_p with x_t built from ε̂(x_0, 0, y)",
}


# -- results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackResult:
    """One attack's scores and metrics (scores: higher = more likely a member)."""

    name: str
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    auc: float
    tpr: dict[str, float]  # FPR_TARGETS key -> TPR
    ci: dict[str, list[float]] | None  # "auc" and FPR_TARGETS keys -> [low, high]
    roc: dict[str, list[float]]
    timesteps: list[int]
    params: dict[str, Any]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        ci = self.ci or {}
        return {
            "description": ATTACK_DESCRIPTIONS[self.name],
            "auc": self.auc,
            "auc_ci": ci.get("auc"),
            **{k: v for key in FPR_TARGETS for k, v in ((key, self.tpr[key]), (f"{key}_ci", ci.get(key)))},
            "timesteps": list(self.timesteps),
            "params": dict(self.params),
            "roc": self.roc,
            "seconds": round(self.seconds, 3),
            "score_summary": {
                "member_mean": float(self.member_scores.mean()),
                "nonmember_mean": float(self.nonmember_scores.mean()),
                "member_std": float(self.member_scores.std()),
                "nonmember_std": float(self.nonmember_scores.std()),
            },
            "diagnostics": self.diagnostics,
        }


@dataclass(frozen=True)
class MembershipResult:
    """Every attack's result, who was attacked, and with what."""

    attacks: dict[str, AttackResult]
    n_members: int
    n_nonmembers: int
    weights: str
    model_dataset: str
    ci_level: float
    bootstrap: int
    excluded_duplicates: int
    condition_counts: dict[int, int]
    holdout_splits: dict[str, int]
    config: dict[str, Any]
    seconds: float
    device: str
    note: str

    @property
    def strongest(self) -> str:
        """The attack with the highest AUC (the one a gate judges)."""
        return max(self.attacks, key=lambda k: self.attacks[k].auc)

    @property
    def auc(self) -> float:
        return self.attacks[self.strongest].auc

    @property
    def auc_any_direction(self) -> float:
        """The max over attacks with a reliably reversed attack (AUC CI entirely below 0.5) counted as 1 − AUC: what
        an attacker who learns each score's sign from shadow models would reach. Not the headline: see `note`."""
        return max(1 - a.auc if a.diagnostics.get("reversed") else a.auc for a in self.attacks.values())

    def tpr_at(self, key: str) -> float:
        """The largest TPR at an FPR target over the attacks (`key` from FPR_TARGETS)."""
        return max(a.tpr[key] for a in self.attacks.values())

    def to_json(self) -> dict[str, Any]:
        """The complete record: headline numbers (max over attacks), per-attack metrics, CIs, ROC points, setup."""
        best = self.attacks[self.strongest]
        return {
            "auc": self.auc,
            "auc_ci": (best.ci or {}).get("auc"),
            "auc_attack": self.strongest,
            **{key: self.tpr_at(key) for key in FPR_TARGETS},
            "auc_any_direction": self.auc_any_direction,
            "attacks": {name: a.to_json() for name, a in self.attacks.items()},
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "timesteps": {name: a.timesteps for name, a in self.attacks.items()},
            "weights": self.weights,
            "ci_level": self.ci_level,
            "bootstrap_resamples": self.bootstrap,
            "model_dataset": self.model_dataset,
            "excluded_duplicates": self.excluded_duplicates,
            "condition_counts": {str(k): v for k, v in self.condition_counts.items()},
            "nonmember_splits": dict(self.holdout_splits),
            "config": dict(self.config),
            "device": self.device,
            "seconds": round(self.seconds, 2),
            "note": self.note,
        }


def membership_summary(result: MembershipResult) -> dict[str, Any]:
    """The `membership` section of `privacy.json`: headline numbers a gate reads (`auc`, `tpr_at_1pct_fpr`, both
    the max over attacks), each attack's metrics with CIs and ROC points for the report's plot, and the caveats."""
    full = result.to_json()
    keep = ("auc", "auc_ci", *(k for key in FPR_TARGETS for k in (key, f"{key}_ci")), "timesteps", "roc")
    return {
        "status": "measured",
        "auc": full["auc"],
        "auc_ci": full["auc_ci"],
        "auc_attack": full["auc_attack"],
        **{key: full[key] for key in FPR_TARGETS},
        "auc_any_direction": full["auc_any_direction"],
        "n_members": full["n_members"],
        "n_nonmembers": full["n_nonmembers"],
        "weights": full["weights"],
        "ci_level": full["ci_level"],
        "attacks": {name: {k: a[k] for k in keep} for name, a in full["attacks"].items()},
        "note": full["note"],
        "explanation": (
            "A white-box attacker who holds the model and a real image guesses whether the image was in the "
            "training set. AUC 0.5 is chance (the model reveals nothing about membership), 1.0 is perfect "
            "identification; TPR at 1% FPR is the share of training images it identifies while wrongly accusing "
            "at most 1% of images the model never saw. The headline numbers are the strongest of the attacks."
        ),
    }


def _note(n_members: int, n_nonmembers: int, level: float, resamples: int, *,
          reversed_attacks: Sequence[str] = ()) -> str:
    parts = [f"{n_members} members vs {n_nonmembers} non-members."]
    for alpha in FPR_TARGETS.values():
        allowed = math.floor(alpha * n_nonmembers + 1e-9)
        label = f"TPR@{alpha:.1%}FPR".replace(".0%", "%")
        if allowed == 0:
            parts.append(f"{label} allows no false positive with {n_nonmembers} non-members: it is the TPR at zero "
                         f"FPR, an extreme-value statistic reported for completeness, not a reliable estimate "
                         f"(needs >= {math.ceil(MIN_FALSE_POSITIVES / alpha)} non-members).")
        elif allowed < MIN_FALSE_POSITIVES:
            parts.append(f"{label} rests on {allowed} allowed false positive(s): treat it as rough "
                         f"(>= {math.ceil(MIN_FALSE_POSITIVES / alpha)} non-members for a usable estimate).")
    if reversed_attacks:
        parts.append(f"Reversed signal ({', '.join(reversed_attacks)}): members score reliably *below* "
                     "non-members (AUC CI under 0.5); the headline AUC counts the published direction only, "
                     "`auc_any_direction` what an attacker who learns the sign from shadow models would reach.")
    if resamples:
        parts.append(f"CIs: {level:.0%} percentile bootstrap, {resamples} resamples of members and non-members.")
    else:
        parts.append("No CIs (bootstrap 0).")
    return " ".join(parts)


# -- the audit -----------------------------------------------------------------------------------------------


def _check_same_dataset(card: Mapping[str, Any], dataset_hash: str, model_dir: Path, real_dir: Path) -> str:
    trained_on = (card.get("inputs") or {}).get("dataset")
    if not trained_on:
        raise InputError(where(model_dir, "model card names no training dataset (inputs.dataset)"))
    if trained_on != dataset_hash:
        raise InputError(
            where(real_dir, f"is dataset {dataset_hash[:12]}…, but the model was trained on {str(trained_on)[:12]}…: "
                            "membership can only be audited against the model's own training data")
        )
    return str(trained_on)


def _check_finite(name: str, values: np.ndarray, model_dir: Path) -> np.ndarray:
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise InputError(where(model_dir, f"{name} attack: {bad} of {values.size} values are NaN/inf (the UNet's "
                                          "outputs are not finite: a diverged model?)"))
    return values


def _evaluate(name: str, scores: np.ndarray, sets: AuditSets, config: MembershipConfig, *, timesteps: list[int],
              params: dict[str, Any], seconds: float, seed: np.random.SeedSequence,
              diagnostics: dict[str, Any]) -> AttackResult:
    pos, neg = scores[sets.is_member], scores[~sets.is_member]
    fpr, tpr = roc_curve(pos, neg)
    ci = (bootstrap_metrics(pos, neg, resamples=config.bootstrap, level=config.ci_level, seed=seed)
          if config.bootstrap else None)
    # Diagnostic: members vs each holdout split alone; a gap between them points at a train/holdout shift.
    by_split = {s: roc_auc(pos, scores[~sets.is_member & (sets.splits == s)])
                for s in HOLDOUT_SPLITS if (~sets.is_member & (sets.splits == s)).any()}
    # Members scoring reliably *lower* than non-members (the whole CI below 0.5): the score carries membership
    # signal the other way round. An attacker who calibrates the sign on shadow models would use it; the headline
    # AUC counts attacks in their published direction only, so this is reported for the reader.
    reversed_ = bool(ci["auc"][1] < 0.5) if ci else None
    return AttackResult(
        name=name, member_scores=pos, nonmember_scores=neg, auc=roc_auc(pos, neg),
        tpr={key: tpr_at_fpr(pos, neg, alpha) for key, alpha in FPR_TARGETS.items()}, ci=ci,
        roc=downsample_roc(fpr, tpr, config.roc_points, min_fpr=1 / neg.size), timesteps=timesteps, params=params,
        seconds=seconds, diagnostics={"auc_vs_holdout_split": by_split, "reversed": reversed_, **diagnostics},
    )


def membership_audit(model_dir: Path, real_dir: Path, *, config: MembershipConfig | None = None) -> MembershipResult:
    """Run the membership-inference attacks of `config` on the model at `model_dir`, with members from the train
    split and non-members from the holdout (val + test) of the canonical dataset `real_dir` it was trained on."""
    import torch

    from synth.conditioning import ConditionSpace
    from synth.data.canonical import load_dataset
    from synth.pipeline import load_pipeline, read_model_card

    config = config or MembershipConfig()
    started = time.monotonic()
    model_dir, real_dir = Path(model_dir), Path(real_dir)
    card = read_model_card(model_dir)
    ds = load_dataset(real_dir)
    model_dataset = _check_same_dataset(card, ds.content_hash, model_dir, real_dir)
    try:
        space = ConditionSpace.from_json(card["conditions"])
    except (KeyError, TypeError) as e:
        raise InputError(where(model_dir, f"model card has no readable condition space ({e!r})")) from None
    want = card.get("image") or {}
    got = ds.header.get("image") or {}
    if any(want.get(k) != got.get(k) for k in ("height", "width", "channels")):
        shape = {k: got.get(k) for k in ("height", "width", "channels")}
        raise InputError(where(real_dir, f"images are {shape}, the model was trained on {want}"))
    sets = select_sets(ds, space.encode_frame, config, where_=real_dir)

    pipe = load_pipeline(model_dir, weights=config.weights, device=config.device)
    unet, scheduler = pipe.unet, pipe.scheduler
    total = int(scheduler.config.num_train_timesteps)
    asked = [*config.loss_timesteps, config.pia_timestep] if "pia" in config.attacks else list(config.loss_timesteps)
    if max(asked) >= total:
        raise ConfigError(where(model_dir, f"timestep {max(asked)} outside the model's 0..{total - 1}"))
    alphas = scheduler.alphas_cumprod.float()
    prediction = str(scheduler.config.get("prediction_type", "epsilon"))
    x0 = to_model_input(sets.images)
    if getattr(pipe, "vae", None) is not None:  # a latent generator's UNet is queried on the images' latents
        x0 = torch.cat([pipe.encode(b).float().cpu() for b in x0.split(config.batch_size)])
    y = torch.from_numpy(sets.conditions)
    seeds = np.random.SeedSequence([config.seed, 2]).spawn(1 + len(config.attacks))

    attacks: dict[str, AttackResult] = {}
    for i, name in enumerate(config.attacks):
        t0 = time.monotonic()
        if name == "loss":
            gen = torch.Generator().manual_seed(int(seeds[0].generate_state(1)[0]))
            noise = torch.randn((config.loss_noise_draws, *x0.shape[1:]), generator=gen)
            errors = _check_finite(name, loss_errors(unet, alphas, x0, y, timesteps=config.loss_timesteps,
                                                     noise=noise, batch_size=config.batch_size,
                                                     prediction_type=prediction), model_dir)
            scores = -errors.mean(axis=(1, 2))
            per_t = {str(t): roc_auc(-errors[sets.is_member, j].mean(1), -errors[~sets.is_member, j].mean(1))
                     for j, t in enumerate(config.loss_timesteps)}
            attacks[name] = _evaluate(
                name, scores, sets, config, timesteps=list(config.loss_timesteps),
                params={"noise_draws": config.loss_noise_draws, "queries_per_image":
                        config.loss_noise_draws * len(config.loss_timesteps)},
                seconds=time.monotonic() - t0, seed=seeds[1 + i],
                # Per-timestep AUCs are for choosing timesteps on *other* data: picking the best one here and
                # reporting it would overstate the attack.
                diagnostics={"auc_per_timestep": per_t},
            )
        else:
            dist = _check_finite(name, pia_distances(unet, alphas, x0, y, timestep=config.pia_timestep,
                                                     p=config.pia_p, batch_size=config.batch_size,
                                                     prediction_type=prediction), model_dir)
            attacks[name] = _evaluate(
                name, -dist, sets, config, timesteps=[0, config.pia_timestep],
                params={"p": config.pia_p, "queries_per_image": 2}, seconds=time.monotonic() - t0,
                seed=seeds[1 + i], diagnostics={},
            )
    cond_counts = {int(c): int((sets.conditions[sets.is_member] == c).sum())
                   for c in np.unique(sets.conditions[sets.is_member])}
    splits = {s: int((sets.splits[~sets.is_member] == s).sum()) for s in HOLDOUT_SPLITS}
    return MembershipResult(
        attacks=attacks,
        n_members=sets.n_members,
        n_nonmembers=sets.n_nonmembers,
        weights=config.weights,
        model_dataset=model_dataset,
        ci_level=config.ci_level,
        bootstrap=config.bootstrap,
        excluded_duplicates=sets.excluded_duplicates,
        condition_counts=cond_counts,
        holdout_splits=splits,
        config=config.model_dump(mode="json"),
        seconds=time.monotonic() - started,
        device=str(unet.device),
        note=_note(sets.n_members, sets.n_nonmembers, config.ci_level, config.bootstrap,
                   reversed_attacks=[k for k, a in attacks.items() if a.diagnostics.get("reversed")]),
    )
