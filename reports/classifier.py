"""The audit classifier: a small ResNet-style CNN that judges whether the clinical signal survives synthesis.

One architecture for every utility setting (TRTR, TRTS, TSTR, augmentation) so differences come from the data,
not the model. It is sized for CPUs (see `SmallResNet`): a stem, three stride-2 residual stages (width w, 2w, 4w),
global average pooling, a linear head.

Training: fixed seeds, AdamW with a one-cycle schedule, light augmentation (small integer shifts, brightness and
contrast; deliberately no horizontal flip: chest X-rays are not left/right symmetric — the heart is on the left), and a
class-weighted cross-entropy so a 3:1 imbalance (PneumoniaMNIST) does not collapse predictions onto the majority.
The checkpoint is chosen on the validation split only (best macro AUROC, ties broken by validation loss): the test
set is never looked at during training or selection.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reports.metrics import auroc_macro
from synth.errors import InputError, where


class ClassifierConfig(BaseModel):
    """Everything that defines one classifier training run (written into the audit header)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(16, ge=4, le=256, description="channels of the first stage; stages are w, 2w, 4w")
    blocks_per_stage: int = Field(1, ge=1, le=4)
    epochs: int = Field(8, ge=1, le=1000)
    # Small training sets get more epochs, so every setting gets at least this many optimizer steps: with epochs
    # alone a 600-image synthetic set got 40 steps against TRTR's ~300, and the undertrained TSTR classifier never
    # predicted one class (balanced accuracy 0.52; 0.88 at 24 epochs, same images: benchmarks/README.md).
    min_steps: int | None = Field(300, ge=1, le=100_000, description="least optimizer steps (None: epochs only)")
    batch_size: int = Field(128, ge=2, le=4096)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    seed: int = 0
    augment: bool = True
    # Maximum shift in pixels at 28×28; scaled with image size.
    max_shift: float = Field(2.0, ge=0.0, le=8.0)
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="± additive shift in [0, 1] intensity units")
    contrast: float = Field(0.15, ge=0.0, le=1.0, description="± relative contrast change")
    class_weighting: bool = True
    eval_batch_size: int = Field(512, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads while training (None: leave as is)")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Block(nn.Module):
    """Basic residual block (two 3×3 convs) with a 1×1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.skip(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN: a full-resolution stem, three stride-2 residual stages, global average pool, linear head.

    At 28×28 the stages run at 14, 7 and 4 pixels; inputs of 48 pixels or more get a stride-2 stem as well
    (64 → 32 → 16, 8, 4), so 64×64 costs about as much as 28×28, and inputs of 96 pixels or more a stride-4 stem
    (128 → 32 → 16, 8, 4), so 128×128 costs about as much again (`stem_stride`). Downsampling right after the stem
    is what makes it CPU-friendly: a full-resolution first stage tripled the cost for no measurable AUROC gain on
    PneumoniaMNIST.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 16, blocks_per_stage: int = 1,
                 image_size: int = 28):
        super().__init__()
        stem_stride = self.stem_stride(image_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = width
        for cout in (width, 2 * width, 4 * width):
            for b in range(blocks_per_stage):
                layers.append(_Block(cin, cout, 2 if b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)

    @staticmethod
    def stem_stride(image_size: int) -> int:
        """The stem's stride for square inputs of `image_size` pixels: the stages then start at 14-32 pixels."""
        return 1 if image_size < 48 else 2 if image_size < 96 else 4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (after global average pooling)."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def init_weights(model: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default initialisation of every conv and linear layer (Kaiming-uniform weights with a = √5,
    uniform biases in ±1/√fan_in; BatchNorm starts at 1 and 0), drawn from `gen` instead of the global RNG."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W[×C] → uint8 tensor N×C×H×W (no copy of the pixels' meaning, just layout)."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.array(arr, order="C"))  # a writable copy (inputs may be read-only memmaps)


def _to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    # [0, 255] → [-1, 1]
    return batch_u8.float().div_(127.5).sub_(1.0)


def _augment(x: torch.Tensor, cfg: ClassifierConfig, gen: torch.Generator) -> torch.Tensor:
    """Random integer shifts (edge pixels repeated) and brightness/contrast jitter. No flips."""
    n, _, h, w = x.shape
    s = round(cfg.max_shift * h / 28.0)
    if s > 0:
        # One gather per batch: shifted row/column indices per image, clamped to the border.
        dy = torch.randint(-s, s + 1, (n, 1), generator=gen)
        dx = torch.randint(-s, s + 1, (n, 1), generator=gen)
        rows = (torch.arange(h)[None] - dy).clamp_(0, h - 1)
        cols = (torch.arange(w)[None] - dx).clamp_(0, w - 1)
        x = x[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if cfg.contrast > 0 or cfg.brightness > 0:
        c = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * cfg.contrast
        b = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * cfg.brightness * 2.0  # [0,1] units → [-1,1] units
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean + b).clamp_(-1.0, 1.0)
    # Plain NCHW strides. With one channel the gathered batch is N×1×H×W with channels-last strides, which
    # `.contiguous()` leaves as is (a size-1 dim's stride does not count), so oneDNN ran the whole network
    # channels-last; its backward pass of the 1×1 stride-2 projection then corrupted memory (segfault, hang)
    # with 3, 5, 6 or 7 torch threads (torch 2.13 CPU).
    return x.clone(memory_format=torch.contiguous_format)


@dataclass
class Classifier:
    """A trained audit classifier: `predict_proba` and `features` take uint8 N×H×W[×C] arrays."""

    model: SmallResNet
    config: ClassifierConfig
    num_classes: int
    image_shape: tuple[int, int, int]  # (height, width, channels)
    best_epoch: int
    val_auroc: float | None
    history: list[dict[str, float | None]] = field(default_factory=list)
    train_seconds: float = 0.0
    n_train: int = 0
    train_class_counts: list[int] = field(default_factory=list)

    def _check(self, images: np.ndarray) -> None:
        arr = np.asarray(images)
        channels = 1 if arr.ndim == 3 else (arr.shape[3] if arr.ndim == 4 else -1)
        shape = (*arr.shape[1:3], channels) if arr.ndim in (3, 4) else arr.shape
        if tuple(shape) != self.image_shape:
            raise InputError(where("classifier", f"expects images of shape {self.image_shape} (H, W, C), got "
                                                 f"{tuple(shape)}"))

    @torch.no_grad()
    def _run(self, images: np.ndarray, fn: str) -> np.ndarray:
        self._check(images)
        self.model.eval()
        x = _as_nchw(images)
        out = []
        with torch_threads(self.config.threads):
            for i in range(0, len(x), self.config.eval_batch_size):
                batch = _to_float(x[i : i + self.config.eval_batch_size])
                if fn == "proba":
                    out.append(torch.softmax(self.model(batch), dim=1))
                else:
                    out.append(self.model.features(batch))
        if not out:
            width = self.num_classes if fn == "proba" else self.model.feature_dim
            return np.zeros((0, width), dtype=np.float64)
        return torch.cat(out).double().numpy()

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, (N, C) float64."""
        return self._run(images, "proba")

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer features, (N, d) float64 (d = 4 × width)."""
        return self._run(images, "features")

    def summary(self) -> dict[str, Any]:
        """What the audit records about this classifier."""
        return {
            "config": self.config.model_dump(mode="json"),
            "architecture": "SmallResNet",
            "feature_dim": self.model.feature_dim,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "epochs": len(self.history),
            "best_epoch": self.best_epoch,
            "val_auroc": self.val_auroc,
            "train_seconds": round(self.train_seconds, 2),
            "n_train": self.n_train,
            "train_class_counts": self.train_class_counts,
            "history": self.history,
        }


def _image_shape(images: np.ndarray, name: str) -> tuple[int, int, int]:
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) == 0:
        raise InputError(where(name, f"images must be a non-empty uint8 N×H×W[×C] array, got {arr.dtype} "
                                     f"{arr.shape}"))
    return (int(arr.shape[1]), int(arr.shape[2]), 1 if arr.ndim == 3 else int(arr.shape[3]))


def epochs_for(config: ClassifierConfig, n_train: int) -> int:
    """Epochs a training set of `n_train` images gets: `epochs`, or more to reach `min_steps` optimizer steps."""
    steps_per_epoch = max(1, -(-n_train // config.batch_size))
    if config.min_steps is None:
        return config.epochs
    return max(config.epochs, -(-config.min_steps // steps_per_epoch))


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    config: ClassifierConfig | None = None,
    num_classes: int | None = None,
) -> Classifier:
    """Train the audit CNN on (images, labels) for `epochs_for(config, len(images))` epochs; pick the epoch with the
    best validation macro AUROC.

    `num_classes` defaults to max(label) + 1 over both sets. The validation split is the only data used for model
    selection. Deterministic for a given config, machine and torch thread count (seeded init, order and
    augmentation; float reductions in the backward pass are split by thread count).
    """
    cfg = config or ClassifierConfig()
    shape = _image_shape(images, "training images")
    val_shape = _image_shape(val_images, "validation images")
    if val_shape != shape:
        raise InputError(where("validation images", f"shape {val_shape} differs from training images {shape}"))
    y = np.array(labels, dtype=np.int64)  # copies: torch wants writable arrays
    yv = np.array(val_labels, dtype=np.int64)
    if len(y) != len(images) or len(yv) != len(val_images):
        raise InputError(where("classifier", "images and labels differ in length"))
    k = int(num_classes or max(y.max(), yv.max()) + 1)
    counts = np.bincount(y, minlength=k)
    if (counts == 0).any():
        raise InputError(where("training images", f"class(es) {np.flatnonzero(counts == 0).tolist()} have no "
                                                   "training images"))

    start = time.perf_counter()
    with torch_threads(cfg.threads):
        # One local generator for initialisation, order and augmentation: the result does not depend on torch's
        # global RNG (nor reseeds it), so trainings running concurrently in threads of one process (a thread-pool
        # task runner) cannot interleave their draws.
        gen = torch.Generator().manual_seed(cfg.seed)
        model = SmallResNet(shape[2], k, width=cfg.width, blocks_per_stage=cfg.blocks_per_stage,
                            image_size=min(shape[0], shape[1]))
        init_weights(model, gen)
        x = _as_nchw(images)
        xv = _as_nchw(val_images)
        yt = torch.from_numpy(y)
        yvt = torch.from_numpy(yv)
        weight = (
            torch.tensor(len(y) / (k * counts), dtype=torch.float32) if cfg.class_weighting else None
        )
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, -(-len(y) // cfg.batch_size))
        epochs = epochs_for(cfg, len(y))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        best_key: tuple[float, float] | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch, best_auroc = 0, None
        history: list[dict[str, float | None]] = []
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(y), generator=gen)
            total, seen = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm needs more than one example per batch
                    continue
                xb = _to_float(x[idx])
                if cfg.augment:
                    xb = _augment(xb, cfg, gen)
                loss = F.cross_entropy(model(xb), yt[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            val_loss, val_auc = _evaluate(model, xv, yvt, k, cfg, weight)
            history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                            "val_auroc": val_auc})
            key = (val_auc if val_auc is not None else -1.0, -val_loss)
            if best_key is None or key > best_key:
                best_key, best_epoch, best_auroc = key, epoch, val_auc
                best_state = copy.deepcopy(model.state_dict())
        if best_state is None:  # cannot happen with epochs >= 1
            raise RuntimeError("no epoch was evaluated")
        model.load_state_dict(best_state)
        model.eval()
    return Classifier(
        model=model, config=cfg, num_classes=k, image_shape=shape, best_epoch=best_epoch, val_auroc=best_auroc,
        history=history, train_seconds=time.perf_counter() - start, n_train=len(y),
        train_class_counts=counts.tolist(),
    )


@torch.no_grad()
def _evaluate(model: SmallResNet, x: torch.Tensor, y: torch.Tensor, k: int, cfg: ClassifierConfig,
              weight: torch.Tensor | None) -> tuple[float, float | None]:
    model.eval()
    logits = torch.cat([model(_to_float(x[i : i + cfg.eval_batch_size]))
                        for i in range(0, len(x), cfg.eval_batch_size)])
    loss = float(F.cross_entropy(logits, y, weight=weight))
    proba = torch.softmax(logits, dim=1).double().numpy()
    auc = auroc_macro(y.numpy(), proba, num_classes=k)
    return loss, (None if np.isnan(auc) else float(auc))
