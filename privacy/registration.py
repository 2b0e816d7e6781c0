"""Geometric verification of copy candidates (the memorization check's `registered` space).

Copy-detection systems re-rank the candidates of a nearest-neighbour search by checking them geometrically; here
the top candidates from the faiss spaces are compared pixel by pixel after the best small alignment of the
synthetic image (integer shift up to `max_shift_px`, mirror, zoom-out by each of `scales` to undo a crop-resize),
on a central window (both lightly blurred, σ = 0.7 px, to forgive a resized copy's interpolation). A 2-px shifted
or cropped copy, far away in raw pixels, comes back at ~0 here. Distances are those of unit vectors, as in
`privacy.search.to_distance`.

Resolution. Shifts, window and blur are measured in pixels of a *registration view* about `view_side` pixels on a
side: images whose shorter side is at least twice `view_side` are area-pooled by `pool_factor` (64 px by 2, 128 px
by 4), so the search covers the same share of the image at every size (a 24/28 crop-resize moves the content by
up to 1/14 of the side: ±2 px at 28 px, ±9 px at 128 px) and costs about the same; smaller images (28 px) are
compared as they are, exactly as before pooling existed. Each query is pooled at every pooling phase (offsets
−f/2..f/2−1 full-resolution pixels in each direction), so the alignment is still found to the full-resolution
pixel: a pooled view alone would leave a copy shifted by 2 of 128 px half a view pixel off.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from privacy.search import to_distance
from synth.errors import ConfigError


class RegistrationConfig(BaseModel):
    """Geometric verification of candidates (the `registered` space)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Largest shift searched, in view pixels (× `pool_factor` full-resolution pixels).
    max_shift_px: int = Field(3, ge=0)
    # Zoom-outs applied to the synthetic image to undo a crop-resize (1.16 undoes cropping 28 → 24 px).
    scales: tuple[float, ...] = (1.0, 1.08, 1.16, 1.24)
    flips: bool = True
    # Gaussian blur (σ in view pixels) of both sides before correlating: forgives the interpolation blur and
    # sub-pixel misfit of a resized copy. 0 = none.
    blur_sigma: float = Field(0.7, ge=0.0, le=3.0)
    # Side of the registration view: images with a shorter side >= 2 × this are area-pooled to about it.
    view_side: int = Field(32, ge=8)
    candidates: int = Field(5, ge=1)  # nearest candidates taken from each faiss space (and query view)
    chunk: int = Field(256, ge=1)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (1.0 <= s <= 2.0) for s in v):
            raise ValueError(f"scales must be a non-empty list of zoom factors in [1, 2], got {list(v)}")
        return tuple(v)

    def pool_factor(self, h: int, w: int) -> int:
        """Area-pooling factor from h×w images to the registration view (1: compared as they are)."""
        return max(1, min(h, w) // self.view_side)


def _float_images(images: np.ndarray):
    """uint8 N×H×W[×C] → torch float32 N×C×H×W."""
    import torch

    x = torch.from_numpy(np.array(images, copy=True)).float()  # a copy: memory-mapped chunks are read-only
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _window(h: int, w: int, r: int) -> tuple[int, int]:
    # One pixel of margin beyond the largest shift keeps every shifted window inside the image.
    wh, ww = h - 2 * r - 2, w - 2 * r - 2
    if min(wh, ww) < 8:
        raise ConfigError(
            f"registration: max_shift_px {r} leaves a {wh}×{ww} window on the {h}×{w} registration view (< 8)"
        )
    return wh, ww


def _blur(x, sigma: float):
    """Separable Gaussian blur of N×C×H×W (edge-replicated), or `x` itself for sigma 0."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    r = max(1, math.ceil(2.5 * sigma))
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma * sigma))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def _pool(x, f: int):
    """Area-pool N×C×H×W by `f` (a trailing remainder of H or W under `f` pixels is dropped)."""
    import torch.nn.functional as F

    return x if f == 1 else F.avg_pool2d(x, f)


def _center_windows(images: np.ndarray, r: int, sigma: float = 0.0, pool: int = 1):
    """Zero-mean unit-norm central windows (N, C, wh, ww) of candidate (training) images, in the view pooled by
    `pool`."""
    x = _pool(_blur(_float_images(images), sigma * pool), pool)
    _, _, h, w = x.shape
    wh, ww = _window(h, w, r)
    oy, ox = (h - wh) // 2, (w - ww) // 2
    win = x[:, :, oy : oy + wh, ox : ox + ww]
    win = win - win.mean(dim=(1, 2, 3), keepdim=True)
    norm = win.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (win / norm.clamp_min(1e-6)) * (norm > 1e-6)


def _phases(x, f: int):
    """The f² pooling phases of N×C×H×W: (N, f², C, H // f, W // f), phase (py, px) pooling the image shifted by
    (py − f//2, px − f//2) full-resolution pixels (edge-replicated), so that view shifts of s pixels and the
    phases together reach every full-resolution shift in [−(r + 1/2)·f, (r + 1/2)·f)."""
    import torch
    import torch.nn.functional as F

    if f == 1:
        return x.unsqueeze(1)
    h, w = x.shape[-2:]
    lo, hi = f // 2, f - 1 - f // 2
    # One box filter at stride 1; each phase is then a strided slice of it.
    box = F.avg_pool2d(F.pad(x, (lo, hi + f - 1, lo, hi + f - 1), mode="replicate"), f, stride=1)
    hv, wv = h // f, w // f
    return torch.stack(
        [box[:, :, py : py + hv * f : f, px : px + wv * f : f] for py in range(f) for px in range(f)], 1
    )


def _query_regions(images: np.ndarray, cfg: RegistrationConfig):
    """Each query's versions (mirror × zoom-out × pooling phase), in the registration view, cropped to the region
    its shifted windows cover: (B, V, C, wh + 2r, ww + 2r)."""
    import torch
    import torch.nn.functional as F

    x = _float_images(images)
    b, c, h, w = x.shape
    f = cfg.pool_factor(h, w)
    # Blurred at full resolution (σ in view pixels), before the zoom: at pool factor 1 exactly as before pooling.
    x = _blur(x, cfg.blur_sigma * f)
    r = cfg.max_shift_px
    versions = []
    for flip in (False, True) if cfg.flips else (False,):
        xf = x.flip(-1) if flip else x
        for s in cfg.scales:
            if s == 1.0:
                versions.append(_phases(xf, f))
                continue
            # Sampling a region s× larger than the image (border-padded) zooms the content out by 1/s.
            theta = torch.tensor([[s, 0.0, 0.0], [0.0, s, 0.0]]).expand(b, 2, 3)
            grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
            zoomed = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
            versions.append(_phases(zoomed, f))
    v = torch.cat(versions, 1)
    hv, wv = v.shape[-2:]
    wh, ww = _window(hv, wv, r)
    oy, ox = (hv - wh) // 2, (wv - ww) // 2
    return v[:, :, :, oy - r : oy + wh + r, ox - r : ox + ww + r]


def _window_norms(region, wh: int, ww: int):
    """‖window − its mean‖ of every (wh × ww) window of `region` (B, V, C, Hr, Wr), channels pooled: (B, V, sy, sx).
    Box sums from integral images, in float64 (the variance is a difference of large sums)."""
    import torch.nn.functional as F

    x = region.double()
    out = []
    for t in (x, x * x):
        ii = F.pad(t.sum(dim=2).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        out.append(ii[..., wh:, ww:] - ii[..., :-wh, ww:] - ii[..., wh:, :-ww] + ii[..., :-wh, :-ww])
    n = region.shape[2] * wh * ww
    return (out[1] - out[0] * out[0] / n).clamp_min(0.0).sqrt().float()


def registered_distances(
    queries: np.ndarray, train: np.ndarray, candidates: np.ndarray, cfg: RegistrationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the best candidate training image after alignment: (distance, training row).

    The distance is that of unit vectors at the best normalised cross-correlation between the query's aligned
    central windows (all shifts up to `max_shift_px` view pixels at every pooling phase, mirror, zoom-outs) and
    the candidate's central window, both in the registration view. The
    correlations of all shifts come from one grouped `conv2d` per chunk (each query's candidates are its kernels).
    """
    import torch
    import torch.nn.functional as F

    n = len(queries)
    dist = np.full(n, np.sqrt(2.0), dtype=np.float32)
    best_row = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return dist, best_row
    candidates = np.where(candidates < 0, candidates[:, :1], candidates)
    needed, inverse = np.unique(candidates, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(candidates.shape))
    k = candidates.shape[1]
    with torch.no_grad():
        # only the candidates' windows
        h, w = np.shape(train)[1:3]
        cand_win = _center_windows(np.asarray(train[needed]), cfg.max_shift_px, cfg.blur_sigma,
                                   cfg.pool_factor(h, w))
        _, c, wh, ww = cand_win.shape
        for lo in range(0, n, cfg.chunk):
            hi = min(n, lo + cfg.chunk)
            b = hi - lo
            region = _query_regions(np.asarray(queries[lo:hi]), cfg)  # B×V×C×Hr×Wr
            v = region.shape[1]
            kernels = cand_win[inverse[lo:hi].reshape(-1)]  # (B·K)×C×wh×ww, zero-mean: Σ(q − q̄)·c = Σ q·c
            inp = region.transpose(0, 1).reshape(v, b * c, region.shape[3], region.shape[4])
            scores = F.conv2d(inp, kernels, groups=b).view(v, b, k, -1)  # V×B×K×shifts
            norm = _window_norms(region, wh, ww).transpose(0, 1).reshape(v, b, 1, -1)
            ncc = torch.where(norm > 1e-6, scores / norm.clamp_min(1e-6), torch.zeros(()))
            per_cand = ncc.amax(dim=(0, 3))  # B×K
            best, arg = per_cand.max(dim=1)
            dist[lo:hi] = to_distance(best.numpy())
            best_row[lo:hi] = candidates[lo:hi][np.arange(b), arg.numpy()]
    return dist, best_row
