"""Image embeddings for copy detection: raw pixels and a small self-supervised copy-detection encoder.

Two spaces, both giving float32 L2-normalised vectors so that one distance (Euclidean between unit vectors, in
[0, 2]; `d² = 2 − 2·cos`) means the same thing everywhere:

- `pixel`: each image flattened, made zero-mean and unit-norm. Invariant to global brightness and contrast
  (an affine change of intensities), blind to geometry: a one-pixel shift or a flip moves an image far away.
- `learned`: a small CNN trained on the real *training* split only with a SimCLR/NT-Xent objective, the two views
  of an image made by the edits a copier would apply (shift, flip, crop-resize, small rotation, Gaussian noise,
  brightness/contrast), in the spirit of copy-detection models such as SSCD (Pizzi et al., CVPR 2022). Instance
  discrimination pushes different training images apart and pulls an image's edited copies onto it, which is
  exactly the geometry a nearest-neighbour memorization check needs.

The encoder is CPU-sized (about 0.7 M multiply-adds per 28×28 image) so that embedding tens of thousands of images
takes seconds. Larger images are average-pooled first by `input_pool(side)` (64 px by 2, 128 px by 4), so the
encoder sees a 28-32 px view and costs the same at every size: the exact pixel space keeps full resolution.
It is saved as a directory artifact (`encoder.json` header + `encoder.safetensors`) with its config and the content
hash of the data it was trained on. No torchvision: augmentations are written with torch ops
(`affine_grid` / `grid_sample` for geometry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.errors import ConfigError, InputError, where
from synth.progress import Progress

ENCODER_KIND = "embedding_encoder"
ENCODER_SCHEMA_VERSION = 1
ENCODER_HEADER = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"
PIXEL = "pixel"
LEARNED = "learned"
# Below this norm a (zero-mean) image is constant: it has no pattern to compare, so it maps to the zero vector.
_EPS = 1e-8
_CHECK_CHUNK = 65_536


class AugmentConfig(BaseModel):
    """The copier's edits the encoder learns to ignore (ranges are per image, uniform; pixels in [0, 1])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_shift_px: float = Field(3.0, ge=0.0)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Crop-resize: the crop's side is `scale` × the image side, resized back to full size.
    min_scale: float = Field(0.75, gt=0.0, le=1.0)
    max_rotation_deg: float = Field(5.0, ge=0.0)
    noise_prob: float = Field(0.5, ge=0.0, le=1.0)
    max_noise_std: float = Field(0.05, ge=0.0)
    max_brightness: float = Field(0.15, ge=0.0)
    contrast_range: tuple[float, float] = (0.7, 1.4)
    # Probability that the first view of a pair is the unedited image: the deployed comparison is an edited copy
    # against an original, and relative edits then reach the full range (two independent edits rarely do).
    clean_view_prob: float = Field(0.5, ge=0.0, le=1.0)


class EncoderConfig(BaseModel):
    """How the learned encoder is built and trained. The defaults train in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(1500, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    temperature: float = Field(0.1, gt=0.0)
    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = Field(256, ge=1)
    dim: int = Field(128, ge=2)
    seed: int = 0
    augment: AugmentConfig = AugmentConfig()


class EmbeddingSpace(Protocol):
    """Anything that maps uint8 images N×H×W[×C] to float32 L2-normalised vectors (N, d)."""

    name: str

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def _check_images(images: np.ndarray, *, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(f"{what}: expected uint8 images, got dtype {images.dtype}")
    if images.ndim not in (3, 4):
        raise InputError(f"{what}: expected N×H×W or N×H×W×C, got shape {images.shape}")
    return images


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (all-zero rows stay zero), as a float32 C-contiguous copy."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > _EPS)
    x[(norms <= _EPS)[:, 0]] = 0.0
    return x


class PixelSpace:
    """Raw pixels, each image flattened, zero-mean and unit-norm."""

    name = PIXEL

    def embed(self, images: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
        images = _check_images(images)
        n = len(images)
        out = np.empty((n, int(np.prod(images.shape[1:]))), dtype=np.float32)
        for lo in range(0, n, chunk):  # chunked: a memmap of 250k images is never copied whole as float64
            x = images[lo : lo + chunk].reshape(min(chunk, n - lo), -1).astype(np.float32)
            x -= x.mean(axis=1, keepdims=True)
            out[lo : lo + chunk] = l2_normalise(x)
        return out


# --------------------------------------------------------------------------------------------------------------
# The learned encoder (torch is imported lazily: `import privacy.embeddings` stays cheap for the CLI).


def input_pool(side: int) -> int:
    """Average-pooling factor in front of the encoder for images of `side` pixels (1 up to 63 px)."""
    return max(1, int(side) // 32)


def _build_net(cfg: EncoderConfig, channels: int, side: int = 28):
    import torch
    from torch import nn

    w1, w2, w3 = cfg.widths

    class CopyNet(nn.Module):
        """Per-image standardisation → 3 strided conv blocks → 4×4 map → MLP → L2-normalised descriptor.

        Standardising first makes the descriptor blind to global brightness/contrast by construction; the 4×4
        map (not a global pool) keeps the coarse layout that tells one chest X-ray from another.
        """

        def __init__(self) -> None:
            super().__init__()
            # No parameters, outside `features`: a 28-px encoder's saved weights keep their keys.
            pool = input_pool(side)
            self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
            self.features = nn.Sequential(
                nn.Conv2d(channels, w1, 3, stride=2, padding=1),
                nn.BatchNorm2d(w1),
                nn.ReLU(inplace=True),
                nn.Conv2d(w1, w2, 3, stride=2, padding=1),
                nn.BatchNorm2d(w2),
                nn.ReLU(inplace=True),
                nn.Conv2d(w2, w3, 3, stride=2, padding=1),
                nn.BatchNorm2d(w3),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(4),
            )
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(w3 * 16, cfg.hidden),
                nn.BatchNorm1d(cfg.hidden),
                nn.ReLU(inplace=True),
                nn.Linear(cfg.hidden, cfg.dim),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(x)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            z = self.head(self.features((x - mean) / std))
            return nn.functional.normalize(z, dim=1)

    return CopyNet()


def _to_tensor(images: np.ndarray):
    """uint8 N×H×W[×C] → float32 N×C×H×W in [0, 1]."""
    import torch

    x = torch.from_numpy(np.array(images, copy=True)).float().div_(255.0)  # copy: memmap chunks are read-only
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def augment(x, cfg: AugmentConfig, generator):
    """One random copier's edit per image of `x` (N×C×H×W floats in [0, 1]), with torch ops only.

    Geometry (flip, shift, crop-resize, rotation) is one affine warp (`affine_grid`/`grid_sample`, border
    padding, as a crop keeps edge content); then contrast around the image mean, brightness, Gaussian noise,
    clamping and 8-bit quantisation (a copy is saved as an image again).
    """
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    scale = u(cfg.min_scale, 1.0)
    angle = u(-cfg.max_rotation_deg, cfg.max_rotation_deg) * (math.pi / 180)
    flip = torch.where(torch.rand(n, generator=generator) < cfg.flip_prob, -1.0, 1.0)
    # A shift of s pixels is 2s/size in grid coordinates; a crop of side `scale` can move (1 − scale) further.
    tx = u(-1, 1) * (2 * cfg.max_shift_px / w) + u(-1, 1) * (1 - scale)
    ty = u(-1, 1) * (2 * cfg.max_shift_px / h) + u(-1, 1) * (1 - scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    contrast = u(*cfg.contrast_range).view(n, 1, 1, 1)
    brightness = u(-cfg.max_brightness, cfg.max_brightness).view(n, 1, 1, 1)
    y = (y - mean) * contrast + mean + brightness
    noisy = (torch.rand(n, generator=generator) < cfg.noise_prob).float().view(n, 1, 1, 1)
    std = u(0.0, cfg.max_noise_std).view(n, 1, 1, 1) * noisy
    y = y + std * torch.randn(y.shape, generator=generator)
    return y.clamp_(0, 1).mul_(255).round_().div_(255)


def nt_xent(z1, z2, temperature: float):
    """SimCLR's normalised-temperature cross entropy for two batches of L2-normalised views."""
    import torch
    import torch.nn.functional as F

    z = torch.cat([z1, z2])
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


class Encoder:
    """The trained copy-detection encoder. `embed(images)` → float32 (N, dim), L2-normalised."""

    name = LEARNED

    def __init__(self, net: Any, config: EncoderConfig, meta: Mapping[str, Any]):
        self.net = net.eval()
        self._fused_net: Any = None
        self.config = config
        # image spec, training-data hash and training log: what `save_encoder` records.
        self.meta = dict(meta)

    @property
    def image(self) -> dict[str, int]:
        return dict(self.meta["image"])

    def _fused(self, x):
        """The eval-mode network with each batch norm folded into the layer before it (same outputs to float
        rounding, ~30% faster on CPU); the identity 4×4 pool is skipped when the map is already 4×4. The input
        pool (64/128 px → the 32-px view the encoder was trained on) comes first, as in `forward`."""
        import torch
        from torch import nn
        from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

        if self._fused_net is None:
            f, h = list(self.net.features), list(self.net.head)
            convs = [fuse_conv_bn_eval(f[i], f[i + 1]) for i in (0, 3, 6)]
            features = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.ReLU()).eval()
            head = nn.Sequential(fuse_linear_bn_eval(h[1], h[2]), nn.ReLU(), h[4]).eval()
            pool, input_pool_ = f[9], self.net.pool

            def run(x: torch.Tensor) -> torch.Tensor:
                x = input_pool_(x)
                mean = x.mean(dim=(1, 2, 3), keepdim=True)
                std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
                z = features((x - mean) / std)
                if z.shape[-2:] != (4, 4):
                    z = pool(z)
                return nn.functional.normalize(head(z.flatten(1)), dim=1)

            self._fused_net = run
        return self._fused_net(x)

    def embed(self, images: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
        import torch

        images = _check_images(images)
        spec = {
            "height": images.shape[1],
            "width": images.shape[2],
            "channels": 1 if images.ndim == 3 else images.shape[3],
        }
        if spec != self.image:
            raise InputError(f"learned encoder: trained on {self.image} images, got {spec}")
        out = np.empty((len(images), self.config.dim), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, len(images), batch_size):
                out[lo : lo + batch_size] = self._fused(_to_tensor(images[lo : lo + batch_size])).numpy()
        return out


def train_encoder(
    images: np.ndarray, config: EncoderConfig | None = None, *, data_hash: str = "", log_every: int = 0,
    threads: int | None = 1,
) -> Encoder:
    """Train the copy-detection encoder on `images` (the real TRAINING split only; never holdout or synthetic).

    Deterministic for `config.seed` at a fixed torch thread count. `data_hash` (e.g. the dataset's content hash
    and split) is recorded with the encoder so a reader knows what it was trained on. `threads`: torch threads
    while training (restored after); 1 by default because the ops are small, and on shared cores extra threads
    made a step ~9× slower here, not faster. None keeps the current setting.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(images, config or EncoderConfig(), data_hash=data_hash, log_every=log_every)
    finally:
        torch.set_num_threads(previous)


def _train(images: np.ndarray, config: EncoderConfig, *, data_hash: str, log_every: int) -> Encoder:
    import torch

    images = _check_images(images, what="encoder training images")
    if len(images) < 2:
        raise InputError(f"encoder training images: need at least 2 images, got {len(images)}")
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    torch.manual_seed(config.seed)
    net = _build_net(config, channels, int(images.shape[1]))
    gen = torch.Generator().manual_seed(config.seed)
    data = _to_tensor(images)
    batch = min(config.batch_size, len(data))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, config.steps // 10)  # linear warm-up over 10% of the steps, then cosine decay to 0

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, config.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    net.train()
    start = time.perf_counter()
    losses: list[float] = []
    # Log lines only (no bar): it trains beside the generator, whose bar owns the terminal.
    progress = Progress("privacy reference: copy-detection encoder", total=config.steps, unit="step", bar=False)
    for step in range(1, config.steps + 1):
        idx = torch.randperm(len(data), generator=gen)[:batch]
        x = data[idx]
        keep = (torch.rand(len(x), generator=gen) < config.augment.clean_view_prob).view(-1, 1, 1, 1)
        view1 = torch.where(keep, x, augment(x, config.augment, gen))
        loss = nt_xent(net(view1), net(augment(x, config.augment, gen)), config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and step % log_every == 0:
            print(f"encoder step {step}/{config.steps} loss {np.mean(losses[-log_every:]):.4f}", flush=True)
        progress.update(1, loss=f"{np.mean(losses[-20:]):.4f}")
    progress.close()
    meta = {
        "image": {"height": int(images.shape[1]), "width": int(images.shape[2]), "channels": channels},
        "trained_on": {"data_hash": data_hash, "images": len(images)},
        "training": {
            "seconds": round(time.perf_counter() - start, 2),
            "final_loss": float(np.mean(losses[-min(50, len(losses)) :])),
            "torch_threads": torch.get_num_threads(),
        },
    }
    return Encoder(net, config, meta)


def training_data_id(dataset_hash: str, split: str = "train") -> str:
    """How an encoder records what it was trained on: `<dataset content hash>:<split>` (the privacy audit accepts
    a saved encoder only when this names its real dataset's training split)."""
    return f"{dataset_hash}:{split}"


def save_encoder(encoder: Encoder, out: Path, *, overwrite: bool = False) -> Path:
    """Write the encoder as a directory artifact: `encoder.json` (config, image spec, training data hash) and
    `encoder.safetensors` (weights and batch-norm statistics)."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        state = {k: v.detach().contiguous() for k, v in encoder.net.state_dict().items()}
        save_file(state, str(tmp / ENCODER_WEIGHTS))
        write_header(
            tmp,
            ENCODER_HEADER,
            kind=ENCODER_KIND,
            schema_version=ENCODER_SCHEMA_VERSION,
            files=[ENCODER_WEIGHTS],
            inputs={"training_data": str(encoder.meta.get("trained_on", {}).get("data_hash", ""))},
            config=encoder.config.model_dump(mode="json"),
            body=dict(encoder.meta),
        )
    return out


def load_encoder(root: Path) -> Encoder:
    """Load an encoder written by `save_encoder`, checking its files against the header's content hash."""
    from pydantic import ValidationError
    from safetensors.torch import load_file

    from synth.config import describe

    root = Path(root)
    header = read_header(root, ENCODER_HEADER, kind=ENCODER_KIND)
    verify_content(root, header)
    try:
        config = EncoderConfig.model_validate(header["config"])
    except ValidationError as e:
        raise ConfigError(where(root / ENCODER_HEADER, describe(e))) from None
    meta = {k: header[k] for k in ("image", "trained_on", "training") if k in header}
    if "image" not in meta:
        raise InputError(where(root / ENCODER_HEADER, "has no image spec"))
    net = _build_net(config, int(meta["image"]["channels"]), int(meta["image"]["height"]))
    try:
        net.load_state_dict(load_file(str(root / ENCODER_WEIGHTS)))
    except (RuntimeError, OSError) as e:
        raise InputError(where(root / ENCODER_WEIGHTS, f"weights do not fit the encoder config ({e})")) from None
    enc = Encoder(net, config, meta)
    enc.meta["content_hash"] = header["content_hash"]
    return enc


def embed(images: np.ndarray, space: str | EmbeddingSpace) -> np.ndarray:
    """Embed uint8 images in `space` ("pixel", or an `Encoder`/other `EmbeddingSpace`): float32 (N, d), rows
    L2-normalised (a constant image in pixel space is the zero vector)."""
    if isinstance(space, str):
        if space == PIXEL:
            return PixelSpace().embed(images)
        raise ConfigError(f"embedding space {space!r}: use 'pixel' or pass a trained Encoder (see load_encoder)")
    return space.embed(images)


def check_embeddings(x: np.ndarray, *, what: str) -> np.ndarray:
    """Validate a provided embedding matrix: 2-D, finite; returned as float32 C-contiguous."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise InputError(f"{what}: embeddings must be a 2-D (N, d) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{what}: embeddings must be floats, got dtype {x.dtype}")
    bad_rows, first = 0, -1
    for lo in range(0, len(x), _CHECK_CHUNK):  # chunked: a 1M×784 matrix gets no full-size boolean temporary
        bad = ~np.isfinite(x[lo : lo + _CHECK_CHUNK]).all(axis=1)
        if bad.any():
            bad_rows += int(bad.sum())
            first = lo + int(np.argmax(bad)) if first < 0 else first
    if bad_rows:
        raise InputError(f"{what}: {bad_rows} embedding rows hold NaN/inf (first at row {first})")
    return np.ascontiguousarray(x, dtype=np.float32)
