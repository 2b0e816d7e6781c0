"""Shared fixtures: the real PneumoniaMNIST (via SYNTHGATE_DATA_DIR) and small canonical slices of it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from synth.data.canonical import load_dataset, write_dataset
from synth.data.ingest import ingest
from synth.data.locate import data_dir as _data_dir

# Keep Prefect and GX quiet and offline in tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Rich wraps at 80 columns when output is not a terminal; wide lines keep paths whole in CLI assertions.
os.environ["COLUMNS"] = "200"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding pneumoniamnist.npz (SYNTHGATE_DATA_DIR or ../shared/data)."""
    path = _data_dir()
    if not (path / "pneumoniamnist.npz").is_file():
        pytest.fail(f"pneumoniamnist.npz not found in {path}; set SYNTHGATE_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def pneumonia_npz(data_dir: Path) -> Path:
    return data_dir / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def kermany_128(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 200 train and 40 test images of kermany_cxr_128.npz (128×128 uint8): the 128-px copy-check tests."""
    path = data_dir / "kermany_cxr_128.npz"
    if not path.is_file():
        pytest.fail(f"kermany_cxr_128.npz not found in {data_dir}; set SYNTHGATE_DATA_DIR")
    with np.load(path) as d:
        return d["train_images"][:200], d["test_images"][:40]


@pytest.fixture(scope="session")
def pneumonia_dataset(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Path:
    """The whole real PneumoniaMNIST as a canonical dataset (default duplicate policy). Read-only."""
    out = tmp_path_factory.mktemp("pneumonia") / "dataset"
    return ingest(pneumonia_npz, out)


def make_slice(source: Path, out: Path, sizes: dict[str, int], *, seed: int = 0) -> Path:
    """A class-balanced random slice of a canonical dataset, written as a new canonical dataset."""
    ds = load_dataset(source)
    meta = ds.metadata
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in sizes.items():
        for label in range(len(ds.class_names)):
            idx = np.flatnonzero(((meta["split"] == split) & (meta["label"] == label)).to_numpy())
            per_class = n // len(ds.class_names)
            rows.extend(rng.choice(idx, size=per_class, replace=False).tolist())
    rows = np.sort(np.asarray(rows))
    return write_dataset(
        out,
        np.asarray(ds.images[rows]),
        meta.iloc[rows].drop(columns="sha256").reset_index(drop=True),
        class_names=ds.class_names,
        source={**ds.header["source"], "slice_of": ds.content_hash, "slice_sizes": sizes, "slice_seed": seed},
        license=ds.header["license"],
        attribution=ds.header["attribution"],
        inputs={"dataset": ds.content_hash},
    )


@pytest.fixture(scope="session")
def pneumonia_slice(tmp_path_factory: pytest.TempPathFactory, pneumonia_dataset: Path) -> Path:
    """64 train / 32 val / 32 test real images, both classes equally. Read-only."""
    out = tmp_path_factory.mktemp("slice") / "dataset"
    return make_slice(pneumonia_dataset, out, {"train": 64, "val": 32, "test": 32})
