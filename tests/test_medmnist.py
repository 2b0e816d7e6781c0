"""The MedMNIST source: real PneumoniaMNIST, download with md5 check, and every bad .npz."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from synth.data import medmnist
from synth.data.medmnist import MedMNISTInfo, read_medmnist, resolve
from synth.errors import InputError


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _good_arrays(n=6, dtype=np.uint8):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8)).astype(dtype)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    return arrays


def test_reads_real_pneumoniamnist(pneumonia_npz):
    data = read_medmnist(pneumonia_npz)
    assert data.images.shape == (5856, 28, 28) and data.images.dtype == np.uint8
    assert data.class_names == ["normal", "pneumonia"]
    assert data.metadata.groupby("split").size().to_dict() == {"test": 624, "train": 4708, "val": 524}
    assert data.license == "CC BY 4.0" and "Kermany" in data.attribution
    assert data.source["sha256"] == "d0bfa3330f26554c4117328b1117f52bfb3746404b0594c58f37a09b4314d396"


def test_float_images_in_unit_range_are_scaled(tmp_path):
    arrays = _good_arrays(dtype=np.float32)
    arrays = {k: (v / 255.0 if k.endswith("images") else v) for k, v in arrays.items()}
    data = read_medmnist(_npz(tmp_path / "f.npz", **arrays))
    assert data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[:6], _good_arrays()["train_images"])


def test_known_name_resolves_in_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTHGATE_DATA_DIR", str(tmp_path))
    target = _npz(tmp_path / "pneumoniamnist.npz", **_good_arrays())
    assert resolve("pneumoniamnist") == target
    with pytest.raises(InputError, match="not a known MedMNIST set"):
        resolve("nosuchmnist")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _Handler(*a, directory=str(served), **k)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _install_fake(monkeypatch, tmp_path, url, md5):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SYNTHGATE_DATA_DIR", str(cache))
    info = MedMNISTInfo("fakemnist", url, md5, ("a", "b"), "test")
    monkeypatch.setitem(medmnist.KNOWN, "fakemnist", info)
    return cache


def test_download_checks_md5(monkeypatch, tmp_path, http_dir):
    served, base = http_dir
    src = _npz(served / "fakemnist.npz", **_good_arrays())
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    cache = _install_fake(monkeypatch, tmp_path, f"{base}/fakemnist.npz", md5)
    data = read_medmnist("fakemnist")
    assert (cache / "fakemnist.npz").read_bytes() == src.read_bytes()
    assert data.class_names == ["a", "b"]


def test_download_with_wrong_md5_leaves_nothing(monkeypatch, tmp_path, http_dir):
    served, base = http_dir
    _npz(served / "fakemnist.npz", **_good_arrays())
    cache = _install_fake(monkeypatch, tmp_path, f"{base}/fakemnist.npz", "0" * 32)
    with pytest.raises(InputError, match="md5"):
        read_medmnist("fakemnist")
    assert not list(cache.iterdir())


def test_offline_error_says_where_to_put_the_file(monkeypatch, tmp_path):
    cache = _install_fake(monkeypatch, tmp_path, "http://127.0.0.1:9/fakemnist.npz", "0" * 32)
    with pytest.raises(InputError) as e:
        read_medmnist("fakemnist")
    assert str(cache / "fakemnist.npz") in str(e.value) and "SYNTHGATE_DATA_DIR" in str(e.value)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _good_arrays()
    zero = tmp_path / "zero.npz"
    zero.write_bytes(b"")
    text = tmp_path / "text.npz"
    text.write_text("this is not an archive\n")
    full = _npz(tmp_path / "full.npz", **good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    no_split = {k: v for k, v in good.items() if not k.startswith("val_")}
    lengths = {**good, "train_labels": good["train_labels"][:-1]}
    nan = {**good, "train_images": good["train_images"].astype(np.float32)}
    nan["train_images"][2, 3, 3] = np.nan
    labels = {**good, "test_labels": np.full((6, 1), 7, np.uint8)}
    return {
        "missing": (tmp_path / "missing.npz", "no such file"),
        "zero-byte": (zero, "empty"),
        "text named .npz": (text, "not a valid .npz"),
        "truncated": (truncated, "not a valid .npz"),
        "no split": (_npz(tmp_path / "nosplit.npz", **no_split), "missing arrays"),
        "length mismatch": (_npz(tmp_path / "len.npz", **lengths), "6 images but 5 labels"),
        "NaN": (_npz(tmp_path / "nan.npz", **nan), "NaN"),
        "label outside classes": (_npz(tmp_path / "labels.npz", **labels), "labels [7] outside"),
    }


@pytest.mark.parametrize("case", ["missing", "zero-byte", "text named .npz", "truncated", "no split",
                                  "length mismatch", "NaN", "label outside classes"])
def test_bad_npz_gets_one_line_error_naming_file(tmp_path, case):
    path, problem = _bad_inputs(tmp_path)[case]
    with pytest.raises(InputError) as e:
        read_medmnist(path, class_names=["a", "b"] if case == "label outside classes" else None)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and problem in message
