"""A corpus of malformed inputs (npz, image folder + CSV, DICOM, release YAML), generated here at test time.

Every one must end as one `error:` line naming the problem, exit 2, no traceback, and nothing written: no output
directory, no temporary directory, and for a release config no stage run at all."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import run
from flows.keys import generate_keys
from tests.test_dicom import make_dicom, ramp, write_csv

SPLITS = ("train", "val", "test")


def _arrays(n=4, shape=(8, 8), dtype=np.uint8, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for s in SPLITS:
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, *shape)).astype(dtype)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    arrays.update(override)
    return arrays


def _npz(path: Path, compressed=False, **override) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **_arrays(**override))
    return path


def _npy_bytes(header: dict, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _declared_huge(path: Path) -> Path:
    # A 784 GB array declared in a header of a few hundred bytes.
    members = {f"{k}.npy": _npy_of(v) for k, v in _arrays().items()}
    members["train_images.npy"] = _npy_bytes({"descr": "|u1", "fortran_order": False,
                                              "shape": (1_000_000, 28_000, 28)}, b"\0" * 64)
    return _zip(path, members)


def _npy_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _bomb(path: Path) -> Path:
    # Deflate-compressed zeros: ~40 kB on disk, 40 MB declared, over the 20 MB limit the test sets.
    members = {f"{k}.npy": _npy_of(v) for k, v in _arrays().items()}
    members["train_images.npy"] = _npy_of(np.zeros((10_000, 64, 64), np.uint8))
    return _zip(path, members, zipfile.ZIP_DEFLATED)


def _mismatched_member(path: Path) -> Path:
    members = {f"{k}.npy": _npy_of(v) for k, v in _arrays().items()}
    members["train_images.npy"] = _npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (4, 8, 8)},
                                             b"\0" * 10)
    return _zip(path, members)


def _bad_header(path: Path) -> Path:
    members = {f"{k}.npy": _npy_of(v) for k, v in _arrays().items()}
    members["train_images.npy"] = b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}\n" + b"\0" * 8
    return _zip(path, members)


def _pickled(path: Path) -> Path:
    arrays = _arrays()
    arrays["train_labels"] = np.array([{"a": 1}] * 4, dtype=object)
    np.savez(path, **arrays)
    return path


def _truncated(path: Path) -> Path:
    _npz(path)
    path.write_bytes(path.read_bytes()[:300])
    return path


NPZ: dict[str, Callable[[Path], Path]] = {
    "empty file": lambda p: (p.write_bytes(b""), p)[1],
    "not a zip": lambda p: (p.write_bytes(b"hello, not an archive"), p)[1],
    "a single .npy": lambda p: (p.write_bytes(_npy_of(np.zeros(3))), p)[1],
    "truncated": _truncated,
    "a text member": lambda p: _zip(p, {"notes.txt": b"hi"}),
    "pickled labels": _pickled,
    "missing arrays": lambda p: (np.savez(p, train_images=np.zeros((2, 4, 4), np.uint8)), p)[1],
    "images of rank 2": lambda p: _npz(p, train_images=np.zeros((4, 8), np.uint8)),
    "four channels": lambda p: _npz(p, train_images=np.zeros((4, 8, 8, 4), np.uint8)),
    "zero images": lambda p: _npz(p, n=0),
    "zero-width images": lambda p: _npz(p, shape=(8, 0)),
    "complex128 images": lambda p: _npz(p, dtype=np.complex128),
    "string images": lambda p: _npz(p, train_images=np.full((4, 8, 8), "x")),
    "NaN pixels": lambda p: _npz(p, train_images=np.full((4, 8, 8), np.nan)),
    "pixels out of range": lambda p: _npz(p, train_images=np.full((4, 8, 8), 300, np.int32)),
    "labels count mismatch": lambda p: _npz(p, train_labels=np.zeros((3, 1), np.int64)),
    "fractional labels": lambda p: _npz(p, train_labels=np.full((4, 1), 0.5)),
    "multi-label": lambda p: _npz(p, train_labels=np.zeros((4, 3), np.int64)),
    "a label of 10^12": lambda p: _npz(p, train_labels=np.array([[0], [1], [0], [10 ** 12]])),
    "negative label": lambda p: _npz(p, train_labels=np.array([[0], [1], [0], [-1]])),
    "splits differ in shape": lambda p: _npz(p, val_images=np.zeros((4, 9, 9), np.uint8)),
    "784 GB declared": _declared_huge,
    "deflate bomb": _bomb,
    "header and data disagree": _mismatched_member,
    "malformed .npy header": _bad_header,
}


@pytest.mark.parametrize("case", list(NPZ))
def test_malformed_npz(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("SYNTHGATE_MAX_INPUT_GB", "0.02")
    src = NPZ[case](tmp_path / "src.npz")
    _expect_one_line_error(tmp_path, capsys, ["ingest", str(src), "--out", str(tmp_path / "ds")], "src.npz")


def _pngs(folder: Path, n=4, size=(8, 8)) -> list[str]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"i{i}.png")
    return [f"i{i}.png,{'a' if i % 2 else 'b'}" for i in range(n)]


def _folder_case(setup: Callable[[Path, Path], None]) -> Callable[[Path], tuple[Path, Path]]:
    def make(root: Path) -> tuple[Path, Path]:
        folder, csv = root / "imgs", root / "labels.csv"
        write_csv(csv, _pngs(folder))
        setup(folder, csv)
        return folder, csv
    return make


def _symlink_out(folder: Path, csv: Path) -> None:
    secret = folder.parent / "elsewhere.png"
    (folder / "i0.png").rename(secret)
    os.symlink(secret, folder / "i0.png")


FOLDER = {
    "csv missing": _folder_case(lambda f, c: c.unlink()),
    "csv empty": _folder_case(lambda f, c: c.write_text("")),
    "header only": _folder_case(lambda f, c: c.write_text("file,label\n")),
    "name,label header": _folder_case(lambda f, c: c.write_text("name,label\ni0.png,a\n")),
    "PHI column": _folder_case(lambda f, c: c.write_text("file,label,date_of_birth\ni0.png,a,2001-01-01\n")),
    "file missing": _folder_case(lambda f, c: (f / "i1.png").unlink()),
    "path leaves the folder": _folder_case(lambda f, c: c.write_text("file,label\n../labels.csv,a\n")),
    "absolute path": _folder_case(lambda f, c: c.write_text("file,label\n/etc/passwd,a\n")),
    "file listed twice": _folder_case(lambda f, c: c.write_text("file,label\ni0.png,a\ni0.png,b\n")),
    "empty label": _folder_case(lambda f, c: c.write_text("file,label\ni0.png,\n")),
    "bad split": _folder_case(lambda f, c: c.write_text("file,label,split\ni0.png,a,holdout\n")),
    "symlink leading outside": _folder_case(_symlink_out),
    "corrupt png": _folder_case(lambda f, c: (f / "i2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")),
    "sizes differ": _folder_case(lambda f, c: Image.new("L", (9, 7)).save(f / "i3.png")),
    "csv not utf-8": _folder_case(lambda f, c: c.write_bytes(b"file,label\ni0.png,\xff\xfe\n")),
    "row longer than header": _folder_case(lambda f, c: c.write_text("file,label\ni0.png,a,extra\n")),
    "reserved column": _folder_case(lambda f, c: c.write_text("file,label,sha256\ni0.png,a,x\n")),
    "over the size limit": _folder_case(lambda f, c: [Image.new("L", (200, 200)).save(f / f"i{i}.png")
                                                      for i in range(4)]),
}


@pytest.mark.parametrize("case", list(FOLDER))
def test_malformed_image_folder(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("SYNTHGATE_MAX_INPUT_GB", "0.0001")  # 100 kB: four 200×200 images are over it
    folder, csv = FOLDER[case](tmp_path)
    _expect_one_line_error(tmp_path, capsys, ["ingest", str(folder), "--csv", str(csv), "--out",
                                              str(tmp_path / "ds")])


def _dicom_case(make: Callable[[Path], None], csv_rows=("a.dcm,x", "b.dcm,y")) -> Callable[[Path], tuple]:
    def build(root: Path) -> tuple[Path, Path]:
        folder = root / "dcm"
        folder.mkdir()
        make_dicom(folder / "b.dcm", ramp(0, 1000))
        make(folder / "a.dcm")
        return folder, write_csv(root / "labels.csv", list(csv_rows))
    return build


def _truncated_dicom(path: Path) -> None:
    make_dicom(path, ramp(0, 1000))
    path.write_bytes(path.read_bytes()[:-10])


def _huge_dicom(path: Path) -> None:
    import pydicom

    make_dicom(path, ramp(0, 1000))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60_000, 60_000  # 3.6 G pixels declared over 32 bytes of pixel data
    ds.save_as(path)


DICOM = {
    "not DICOM": _dicom_case(lambda p: p.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)),
    "no pixel data": _dicom_case(lambda p: make_dicom(p, None)),
    "multi-frame": _dicom_case(lambda p: make_dicom(p, np.stack([ramp(0, 9)] * 2), frames=2)),
    "colour": _dicom_case(lambda p: make_dicom(p, np.zeros((4, 4, 3), np.uint8), photometric="RGB", samples=3)),
    "truncated pixel data": _dicom_case(_truncated_dicom),
    "3.6 G pixels declared": _dicom_case(_huge_dicom),
}


@pytest.mark.parametrize("case", list(DICOM))
def test_malformed_dicom(tmp_path, capsys, case):
    folder, csv = DICOM[case](tmp_path)
    _expect_one_line_error(tmp_path, capsys, ["ingest", str(folder), "--csv", str(csv), "--out",
                                              str(tmp_path / "ds"), "--format", "dicom"])


YAML = {
    "not YAML": "source: [unclosed\n",
    "not a mapping": "- a\n- b\n",
    "unknown key": "sauce: {path: x.npz}\n",
    "wrong type": "generate: {n: many}\n",
    "invalid release id": "release_id: Bad/ID\n",
    "5,000-character release id": "release_id: " + "a" * 5000 + "\n",
    "source missing": "source: {path: nowhere.npz}\n",
    "unknown named set": "source: {path: nosuchmnist}\n",
    "csv missing": "source: {path: imgs, csv: nowhere.csv}\n",
    "folder without csv": "source: {path: imgs, format: imagefolder}\n",
    "key missing": "private_key: nowhere.key\n",
    "deeply nested": "purpose: " + "[" * 5000 + "]" * 5000 + "\n",
    "negative shards": "runner: {shards: -1}\n",
    "passphrase variable unset": "passphrase_env: SYNTHGATE_TEST_UNSET_VARIABLE\n",
}


@pytest.mark.parametrize("case", list(YAML))
def test_malformed_release_config(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    generate_keys(tmp_path / "keys")
    _pngs(tmp_path / "imgs")
    (tmp_path / "ok.npz").write_bytes(b"")
    base = "workdir: work\nreleases_dir: releases\nprivate_key: keys/release.key\nsource: {path: ok.npz}\n"
    text = YAML[case]
    # later keys win in YAML mappings only by replacement, so write each case's keys over a base without them
    keys = {line.split(":")[0] for line in text.splitlines() if ":" in line and not line.startswith(" ")}
    config = "".join(line + "\n" for line in base.splitlines() if line.split(":")[0] not in keys) + text
    (tmp_path / "release.yaml").write_text(config)
    monkeypatch.setattr("flows.release.release", _no_stage_may_run)
    _expect_one_line_error(tmp_path, capsys, ["release", "--config", "release.yaml", "--auto-approve"])
    assert not (tmp_path / "work").exists() and not (tmp_path / "releases").exists()


def _no_stage_may_run(*args, **kwargs):
    raise AssertionError("the release flow started on a config that preflight should have refused")


def _expect_one_line_error(tmp_path: Path, capsys, argv: list[str], names: str | None = None) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = run(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err + captured.out
    if names:
        assert names in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_corpus_is_large_enough():
    assert len(NPZ) + len(FOLDER) + len(DICOM) + len(YAML) >= 40
