"""An empirical check of the DP claim: one extra DP training run with canaries (Steinke, Nasr & Jagielski 2023).

The accountant's ε is a theorem about DP-SGD; whether *this* code runs DP-SGD (every contribution clipped to C,
noise N(0, σ²C²) really added, examples sampled at the rate the accountant assumes) is an empirical question. This
audit answers it in one training run instead of the hundreds classic auditing needs:

1. m canaries each join the training set independently with probability 1/2. A canary is a *gradient* canary
   (a "Dirac canary", Nasr et al. 2023): an example whose per-example gradient is C on one coordinate of one weight
   tensor and 0 elsewhere. Each step, Poisson sampling picks every included canary with the same probability q as
   a real example, and its gradient row joins the real examples' rows *before* Opacus clips, sums and noises them,
   so the audited path is the release's own (`CanaryInjection` wraps the release's DP strategy).
2. One training run with the release's DP code and settings, calibrated to `DPAuditConfig.epsilon`, on the
   private train split.
3. Each canary is scored by how far training moved its coordinate against its gradient (θ₀ − θ_T): a canary that
   was sampled pushed it; noise alone moves it either way. The audit guesses the highest scores "in", the lowest
   "out".
4. `privacy.dp_bound` turns the number of correct guesses into an ε lower bound that holds with probability
   ≥ 1 - significance. If it exceeds the run's claimed ε, the implementation does not deliver its claim.

Why gradient canaries: image canaries scored by their denoising loss were measured first and had no power here
(a 60-step run with the noise switched off scored ε ≥ 0.00 with 200 canaries): a diffusion model's loss on one
image moves too little in a CPU budget. Gradient canaries test exactly the mechanism (clipping, noise, sampling,
accounting); the per-example gradients of real examples are tested separately against autograd (tests/test_dp.py).

Why at a small ε rather than the release's: with m canaries the audit cannot show more than about
log(m / log(1/α)) (~4.6 for m = 1000), so it could never catch a broken run that claims ε = 10; the mechanism is
the same at every ε, and a bug that removes the noise shows at ε = 1. The audit's model lives only in a temporary
directory; the artifact holds the canaries' scores, the guesses and the bound.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from privacy.dp_audit_config import DPAuditConfig
from privacy.dp_bound import GUESS_FRACTIONS, audit_scores, epsilon_ceiling
from synth.artifacts import atomic_dir, write_header, write_json
from synth.errors import ConfigError, where

DP_AUDIT_HEADER = "dp_audit.json"
DP_AUDIT_KIND = "dp_audit"
SCORES = "canary_scores.json"
SCHEMA_VERSION = 1


class CanaryInjection:
    """A DP strategy with gradient canaries: delegates everything to the release's strategy and, after each
    backward (and the K fold), appends one per-example gradient row for each included canary that this step's
    Poisson sampling picks (rate q, as for every example): C on the canary's coordinate, 0 elsewhere."""

    def __init__(self, inner: Any, included: np.ndarray, *, seed: int):
        self.inner = inner
        self.included = np.flatnonzero(np.asarray(included, dtype=bool))
        self.m = len(included)
        self._rng = np.random.default_rng(seed)
        self.target: Any = None  # the weight tensor holding the canary coordinates (the largest one)
        self.coordinates: np.ndarray | None = None  # canary i's flat index into `target`
        self.initial: np.ndarray | None = None  # θ₀ at those coordinates
        self.sampled = np.zeros(self.m, dtype=np.int64)  # times each canary was sampled (diagnostics)
        self.target_name: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def attach(self, model, optimizer, data_loader, **kwargs):
        """Attach the release's strategy, then choose the canary coordinates in its model's largest weight."""
        dp_model, dp_optimizer, dp_loader = self.inner.attach(model, optimizer, data_loader, **kwargs)
        self.target = max((p for p in dp_model.parameters() if p.requires_grad), key=lambda p: p.numel())
        if self.target.numel() < self.m:
            raise ConfigError(where("DP audit config", f"canaries {self.m} exceed the {self.target.numel()} "
                                                       "coordinates of the model's largest weight"))
        self.coordinates = self._rng.choice(self.target.numel(), size=self.m, replace=False)
        self.initial = self.target.detach().flatten()[self.coordinates].cpu().double().numpy().copy()
        return dp_model, dp_optimizer, dp_loader

    def after_backward(self, model, batch_size: int) -> None:
        """The release's fold, then this step's sampled canaries as extra gradient rows (once per logical batch:
        on its last physical chunk)."""
        import torch

        # With physical batches the release strategy knows whether this chunk ends its logical batch (it forgets
        # in after_backward); a canary joins a logical batch once.
        last_chunk = getattr(self.inner, "_chunk_is_last", None) is not False
        self.inner.after_backward(model, batch_size)
        if not last_chunk or not len(self.included):
            return
        picked = self.included[self._rng.random(len(self.included)) < self.inner.sample_rate]
        if not len(picked):
            return
        self.sampled[picked] += 1
        clip = float(self.inner.config.max_grad_norm)
        for p in model.parameters():
            if not p.requires_grad:
                continue
            rows = torch.zeros((len(picked), *p.shape), dtype=p.grad_sample.dtype, device=p.grad_sample.device)
            if p is self.target:
                flat = rows.view(len(picked), -1)
                flat[torch.arange(len(picked)), torch.as_tensor(self.coordinates[picked])] = clip
            p.grad_sample = torch.cat([p.grad_sample, rows])

    def unwrap(self, model):
        """The release strategy's unwrap; also notes the target weight's name in the plain UNet (the name its
        weights are saved under)."""
        plain = self.inner.unwrap(model)
        if self.target_name is None:
            self.target_name = next(name for name, p in plain.named_parameters() if p is self.target)
        return plain


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
    import torch
    from safetensors.torch import load_file

    from privacy.dp import make_strategy
    from privacy.dp_config import DPConfig
    from synth.data.canonical import load_dataset
    from synth.training import train

    ds = load_dataset(dataset_dir)
    included = np.random.default_rng(config.seed).random(config.canaries) < 0.5
    audit_dp = DPConfig(**{**dp_config.to_dict(), "target_epsilon": config.epsilon})
    inner = (strategy_factory or make_strategy)(audit_dp, dataset_size=ds.split_size("train"),
                                                noise_multiplicity=train_config.noise_multiplicity)
    strategy = CanaryInjection(inner, included, seed=config.seed + 1)
    with tempfile.TemporaryDirectory(prefix="synthgate-dp-audit-") as tmp:
        model = train(dataset_dir, Path(tmp) / "model", train_config, privacy=strategy, progress=False)
        final = load_file(str(Path(model) / "unet" / "diffusion_pytorch_model.safetensors"))[strategy.target_name]
        moved = final.flatten()[torch.as_tensor(strategy.coordinates)].double().numpy()
        run_epsilon, run_delta = float(inner.epsilon()), float(inner.target_delta)
        sigma = float(inner.noise_multiplier)
    scores = strategy.initial - moved  # a sampled canary's gradient pushed its coordinate down
    best, every = audit_scores(scores, included, delta=run_delta, significance=config.significance)
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
        "included": int(included.sum()),
        "target_weight": strategy.target_name,
        "mean_times_sampled": float(strategy.sampled[included].mean()) if included.any() else 0.0,
        "guesses": [asdict(g) for g in every],
        "best_guess": asdict(best),
        "release_claim": dict(claimed or {}),
        "explanation": _explain(violated, best.epsilon_lower_bound, run_epsilon, ceiling, config),
    }
    with atomic_dir(Path(out)) as tmp_out:
        write_json(tmp_out / SCORES, {"score": scores.tolist(), "included": included.tolist(),
                                      "times_sampled": strategy.sampled.tolist()})
        write_header(tmp_out, DP_AUDIT_HEADER, kind=DP_AUDIT_KIND, schema_version=SCHEMA_VERSION, files=[SCORES],
                     inputs={"dataset": ds.content_hash},
                     config={"audit": config.model_dump(mode="json"), "train": train_config.to_json(),
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
