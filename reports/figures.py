"""Figures for the audit report: image grids (exact pixels) and matplotlib plots, all as deterministic PNG bytes.

Image grids are written with Pillow at the images' native resolution (the HTML scales them up with
`image-rendering: pixelated`), so every tile of a grid holds exactly the pixels of one image: what a grid shows can
be checked tile by tile against pixel hashes (the public report's test does that). Plots use matplotlib's Agg
canvas directly (no pyplot, no global figure state), the default style, a fixed DPI and no `Software` metadata, so
the same numbers give the same bytes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DPI = 80
GRID_PAD = 1  # pixels of background between tiles (and around the grid)
GRID_BACKGROUND = 255
MAX_ROC_PANELS = 6


def data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _as_hwc(images: np.ndarray) -> np.ndarray:
    """N×H×W or N×H×W×C uint8 → N×H×W×C with C in (1, 3)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 N×H×W[×C], got {arr.dtype} {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[3] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {arr.shape[3]}")
    return arr


def tile_grid(images: np.ndarray, ncols: int, *, pad: int = GRID_PAD) -> np.ndarray:
    """Images laid out row by row in a grid with `pad` background pixels between and around tiles.

    Returns H×W (grayscale) or H×W×3 uint8. Tile (r, c) starts at `(pad + r·(h + pad), pad + c·(w + pad))`.
    """
    arr = _as_hwc(images)
    n, h, w, ch = arr.shape
    if n == 0:
        raise ValueError("no images to lay out")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), ch), GRID_BACKGROUND, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid[..., 0] if ch == 1 else grid


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of an H×W or H×W×3 uint8 array (no text or time chunks: same pixels, same bytes)."""
    from PIL import Image

    arr = np.ascontiguousarray(pixels)
    mode = "L" if arr.ndim == 2 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No "Software" text chunk (it carries the matplotlib version); Agg writes no timestamp.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _styled(draw):  # decorator: every plot is drawn in matplotlib's default style, whatever rcParams say
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        import matplotlib.style

        with matplotlib.style.context("default"):
            return draw(*args, **kwargs)

    wrapper.__doc__ = draw.__doc__
    wrapper.__name__ = draw.__name__
    return wrapper


@_styled
def roc_figure(panels: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], *, title: str) -> bytes:
    """ROC curves: `{panel title: {curve label: {"fpr": [...], "tpr": [...]}}}`, one axes per panel (at most
    `MAX_ROC_PANELS`), with the chance diagonal."""
    items = list(panels.items())[:MAX_ROC_PANELS]
    n = max(1, len(items))
    fig = _figure(3.4 * n + 0.4, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (panel, curves) in zip(axes, items, strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":", label="chance")
        for label, pts in curves.items():
            fpr, tpr = list(pts.get("fpr") or []), list(pts.get("tpr") or [])
            if fpr and len(fpr) == len(tpr):
                ax.plot(fpr, tpr, lw=1.6, label=str(label))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(str(panel), fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig)


@_styled
def log_roc_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], *, title: str) -> bytes:
    """Membership-inference ROC curves on log–log axes (the low-FPR region is what matters for an attack)."""
    fig = _figure(4.4, 3.8)
    ax = fig.subplots()
    grid = np.logspace(-4, 0, 50)
    ax.loglog(grid, grid, color="0.7", lw=1, ls=":", label="chance")
    for label, pts in curves.items():
        fpr = np.asarray(pts.get("fpr") or [], dtype=float)
        tpr = np.asarray(pts.get("tpr") or [], dtype=float)
        keep = (fpr > 0) & (tpr > 0)
        if keep.any() and len(fpr) == len(tpr):
            ax.loglog(fpr[keep], tpr[keep], lw=1.6, label=str(label))
    ax.axvline(0.01, color="0.5", lw=0.8, ls="--")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig)


@_styled
def histogram_figure(edges: Sequence[float], series: Mapping[str, Sequence[int]], *, threshold: float | None,
                     title: str) -> bytes:
    """Step histograms over shared bin `edges` (each series normalised to a density, so sets of different sizes
    compare), with the calibrated threshold as a vertical line."""
    e = np.asarray(edges, dtype=float)
    widths = np.diff(e)
    fig = _figure(4.6, 3.2)
    ax = fig.subplots()
    for label, counts in series.items():
        c = np.asarray(counts, dtype=float)
        total = c.sum()
        if len(c) != len(widths) or total <= 0:
            continue
        density = c / (total * np.where(widths > 0, widths, 1.0))
        ax.stairs(density, e, lw=1.6, label=f"{label} (n={int(total)})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="tab:red", lw=1.2, ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("distance to nearest training image")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig)


@_styled
def augmentation_figure(points: Sequence[Mapping[str, Any]], *, metric: str = "auroc") -> bytes:
    """Test AUROC (with CI bars) against the synthetic:real ratio added to the real training set."""
    xs, ys, lo, hi = [], [], [], []
    for p in points:
        m = p.get(metric) or {}
        v = m.get("value")
        if v is None:
            continue
        ci = m.get("ci") or [v, v]
        xs.append(float(p.get("ratio_effective", p.get("ratio", 0.0))))
        ys.append(float(v))
        lo.append(float(v) - float(ci[0] if ci[0] is not None else v))
        hi.append(float(ci[1] if ci[1] is not None else v) - float(v))
    fig = _figure(4.6, 3.2)
    ax = fig.subplots()
    if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, lw=1.4)
        ax.axhline(ys[0], color="0.6", lw=0.8, ls=":", label="real only (TRTR)")
        ax.legend(fontsize=8)
    ax.set_xlabel("synthetic images added per real training image")
    ax.set_ylabel(f"test {metric.upper()}")
    ax.set_title("Augmentation: real + synthetic training", fontsize=10)
    return _save(fig)
