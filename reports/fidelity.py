"""Fidelity of a synthetic image set in a domain feature space: FID, KID and precision/recall.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the two feature sets,
  ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), with `scipy.linalg.sqrtm` in float64; when the product is singular
  (fewer images than dimensions) a small ridge is added to both covariances, and a complex square root whose
  imaginary part is not negligible is an error rather than silently dropped. FID is biased upwards for small
  sets: compare values computed at similar sizes (the audit reports a real-vs-real floor beside each value).
- KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³,
  averaged over random equal-size subsets (mean and standard deviation over subsets). Unbiased: ≈ 0, and possibly
  slightly negative, for two samples of one distribution.
- Precision/recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its points with
  radius the distance to the point's k-th nearest neighbour (k = 3). Precision = fraction of synthetic points
  inside the real manifold (are the samples realistic?); recall = fraction of real points inside the synthetic
  manifold (is the variety covered?). Both sets are subsampled to the same size, as the estimate depends on it.

Feature spaces (built in `reports/utility.py`): the TRTR classifier's penultimate layer (always), the privacy
audits' copy-detection encoder (`privacy/embeddings.py`, when an encoder directory is given) and Inception-v3 only
from a TorchScript file the user supplies (`inception_features`); nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from pydantic import BaseModel, ConfigDict, Field

from synth.errors import InputError, where

# Relative size of the imaginary part of sqrtm(Σ₁Σ₂) we accept as round-off.
_IMAG_TOL = 1e-3


class FidelityConfig(BaseModel):
    """Settings of the fidelity metrics (written into the audit header)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kid_subset_size: int = Field(1000, ge=2)
    kid_subsets: int = Field(100, ge=1)
    pr_k: int = Field(3, ge=1)
    pr_max_samples: int = Field(10_000, ge=2, description="each side is subsampled to min(n_real, n_syn, this)")
    min_images: int = Field(10, ge=2, description="fewer images on either side: the metrics are not computed")
    seed: int = 0


def _as_features(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InputError(where(what, f"features must be an (N >= 2, d) array, got shape {x.shape}"))
    if not np.isfinite(x).all():
        raise InputError(where(what, "features hold NaN or inf"))
    return x


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: {mu1.shape} {mu2.shape} {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all() or any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
        # Singular product (fewer samples than dimensions, or dead ReLU features that are constant): the square
        # root is inaccurate. Add a ridge relative to the covariances' scale (features of different models differ
        # in scale by orders of magnitude) and compute the distance between the regularised Gaussians throughout,
        # so the ridge cancels instead of biasing the trace terms.
        scale = float(np.trace(s1) + np.trace(s2)) / (2 * len(mu1))
        offset = np.eye(len(mu1)) * eps * (scale if scale > 0 else 1.0)
        s1, s2 = s1 + offset, s2 + offset
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        scale = max(1e-300, float(np.abs(covmean.real).max()))
        if np.abs(covmean.imag).max() > _IMAG_TOL * scale:
            raise ValueError(f"sqrtm(Σ₁Σ₂) has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # tiny negative values are round-off


def fid(real: np.ndarray, synthetic: np.ndarray) -> float:
    """FID between two feature sets (N, d)."""
    a, b = _as_features(real, "real features"), _as_features(synthetic, "synthetic features")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _gram(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y.T in float64 through torch, so torch's thread setting (the audit's `threads`) governs it: numpy's BLAS
    ignores it and, on shared cores, oversubscribed threads made KID 4× slower."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(x)) @ torch.from_numpy(np.ascontiguousarray(y)).T).numpy()


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = _gram(x, y)
    k /= x.shape[1]
    k += 1.0
    cube = k * k  # explicit products: `** 3` goes through pow() and was most of KID's time
    cube *= k
    return cube


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (diagonal terms excluded from the within-set means)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kid(real: np.ndarray, synthetic: np.ndarray, *, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> dict[str, float | int]:
    """KID: mean and standard deviation of the unbiased MMD² over random subsets (without replacement)."""
    a, b = _as_features(real, "real features"), _as_features(synthetic, "synthetic features")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(subsets)
    ])
    return {"value": float(values.mean()), "std": float(values.std(ddof=1)) if subsets > 1 else 0.0,
            "subset_size": int(m), "subsets": int(subsets)}


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * _gram(a, b)
    return np.maximum(d, 0.0)


def _rows_per_block(columns: int) -> int:
    return max(1, 4_000_000 // max(columns, 1))  # ~32 MB of float64 distances per block


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point of the same set."""
    k = min(k, len(x) - 1)
    out = np.empty(len(x))
    step = _rows_per_block(len(x))
    for lo in range(0, len(x), step):
        d = _sq_dists(x[lo : lo + step], x)
        # Column k of the partition is the k-th neighbour: column 0 is the point itself (distance 0).
        out[lo : lo + step] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(queries: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray) -> float:
    """Fraction of `queries` inside at least one reference ball."""
    inside = np.zeros(len(queries), dtype=bool)
    step = _rows_per_block(len(ref))
    for lo in range(0, len(queries), step):
        d = _sq_dists(queries[lo : lo + step], ref)
        inside[lo : lo + step] = (d <= ref_radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, synthetic: np.ndarray, *, k: int = 3, max_samples: int = 10_000,
                     seed: int = 0) -> dict[str, float | int]:
    """Improved precision and recall (k-NN manifolds); both sets subsampled to the same size first."""
    a, b = _as_features(real, "real features"), _as_features(synthetic, "synthetic features")
    n = min(len(a), len(b), max_samples)
    rng = np.random.default_rng(seed)
    a = a[np.sort(rng.choice(len(a), n, replace=False))]
    b = b[np.sort(rng.choice(len(b), n, replace=False))]
    return {
        "precision": _coverage(b, a, knn_radii(a, k)),
        "recall": _coverage(a, b, knn_radii(b, k)),
        "k": int(min(k, n - 1)),
        "n": int(n),
    }


def _sig(v: float) -> float:
    """Six significant digits: feature spaces differ in scale, so a fixed number of decimals could erase a value."""
    return float(f"{v:.6g}")


def fidelity_metrics(real: np.ndarray, synthetic: np.ndarray, *, config: FidelityConfig | None = None,
                     ) -> dict[str, Any]:
    """FID, KID and precision/recall between two feature sets; `{"skipped": ...}` when either is too small."""
    cfg = config or FidelityConfig()
    n_r, n_s = len(real), len(synthetic)
    out: dict[str, Any] = {"n_real": int(n_r), "n_synthetic": int(n_s)}
    if min(n_r, n_s) < cfg.min_images:
        out["skipped"] = f"fewer than {cfg.min_images} images on one side"
        return out
    pr = precision_recall(real, synthetic, k=cfg.pr_k, max_samples=cfg.pr_max_samples, seed=cfg.seed)
    out.update(
        fid=_sig(fid(real, synthetic)),
        kid={k: (_sig(v) if isinstance(v, float) else v) for k, v in
             kid(real, synthetic, subset_size=cfg.kid_subset_size, subsets=cfg.kid_subsets, seed=cfg.seed).items()},
        precision=_sig(pr["precision"]),
        recall=_sig(pr["recall"]),
        pr_k=pr["k"],
        pr_n=pr["n"],
    )
    return out


def fidelity_by_class(
    real: np.ndarray,
    real_labels: np.ndarray,
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    *,
    class_names: Sequence[str],
    config: FidelityConfig | None = None,
) -> dict[str, Any]:
    """`fidelity_metrics` overall and per class (real by label, synthetic by conditioned label)."""
    yr, ys = np.asarray(real_labels), np.asarray(synthetic_labels)
    return {
        "overall": fidelity_metrics(real, synthetic, config=config),
        "per_class": {
            name: fidelity_metrics(real[yr == c], synthetic[ys == c], config=config)
            for c, name in enumerate(class_names)
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Inception-v3 features, only from a file the user supplies.

INCEPTION_SIZE = 299


def inception_features(weights: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A feature function from a user-supplied Inception TorchScript file (never downloaded).

    The module is called with float32 images N×3×299×299 with values in [0, 255] (grayscale repeated to three
    channels, resized bilinearly), with `return_features=True` when its `forward` takes that argument (as the
    TorchScript Inception used by StyleGAN/clean-fid does), and must return (N, d) features (typically 2048-d
    pool features). A plain state dict is refused: building the Inception-v3 architecture needs torchvision, which
    synthgate does not use; export the model with `torch.jit.script`/`torch.jit.trace` + `torch.jit.save` instead.
    """
    import torch

    path = Path(weights)
    if not path.is_file():
        raise InputError(where(path, "Inception weights file not found"))
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # any failure means "not TorchScript"; we then say what it is instead
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        if isinstance(obj, dict):
            raise InputError(where(path, "is a state dict; synthgate cannot build Inception-v3 without torchvision "
                                         "— pass a TorchScript export (torch.jit.save) instead")) from None
        raise InputError(where(path, "is not a TorchScript module")) from None
    module.eval()
    try:
        arg_names = [a.name for a in module.forward.schema.arguments]
    except (AttributeError, RuntimeError):
        arg_names = []
    kwargs = {"return_features": True} if "return_features" in arg_names else {}

    @torch.no_grad()
    def features(images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        arr = np.asarray(images)
        x = torch.from_numpy(np.ascontiguousarray(arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)))
        out = []
        for lo in range(0, len(x), batch_size):
            b = x[lo : lo + batch_size].float()
            if b.shape[1] == 1:
                b = b.repeat(1, 3, 1, 1)
            b = torch.nn.functional.interpolate(b, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                                align_corners=False)
            try:
                f = module(b, **kwargs)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
                raise InputError(where(path, f"Inception module failed on a 3×299×299 batch ({first})")) from None
            if isinstance(f, tuple | list):
                f = f[0]
            f = f.reshape(len(b), -1) if f.ndim == 4 and f.shape[2:] == (1, 1) else f
            if f.ndim != 2:
                raise InputError(where(path, f"Inception module must return (N, d) features, got {tuple(f.shape)}"))
            out.append(f.double())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))

    return features
