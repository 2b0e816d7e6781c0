"""`synthgate ingest` end to end for the folder sources, and the bad inputs that must exit 2 leaving nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flows.cli import run
from synth.data.canonical import load_dataset
from tests.test_dicom import make_dicom, ramp, write_csv


def _png_folder(root, n=8):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 32), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{'normal' if i % 2 else 'pneumonia'},p{i // 2},{'F' if i % 3 else 'M'}")
    return write_csv(root / "labels.csv", rows, header="file,label,patient_id,sex")


def test_cli_ingests_image_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    csv = _png_folder(folder)
    out = tmp_path / "ds"
    assert run(["ingest", str(folder), "--csv", str(csv), "--out", str(out), "--size", "16"]) == 0
    ds = load_dataset(out, verify=True)
    assert ds.images.shape == (8, 16, 16)
    assert ds.header["source"]["format"] == "imagefolder" and ds.header["attributes"] == ["sex"]
    # Whole patients go to one split.
    assert (ds.metadata.groupby("patient_id")["split"].nunique() == 1).all()


def test_cli_ingests_dicom_with_window(tmp_path):
    folder = tmp_path / "dcm"
    for i in range(4):
        make_dicom(folder / f"s{i}.dcm", ramp(0, 1000))
    csv = write_csv(tmp_path / "labels.csv", [f"s{i}.dcm,{'a' if i % 2 else 'b'},{'train' if i < 2 else 'test'}"
                                               for i in range(4)], header="file,label,split")
    out = tmp_path / "ds"
    assert run(["ingest", str(folder), "--csv", str(csv), "--out", str(out), "--window", "500", "200",
                "--duplicates", "keep"]) == 0
    ds = load_dataset(out)
    img = np.asarray(ds.images[0])
    # Window 500±100: everything below 400 is black, above 600 white.
    assert img.min() == 0 and img.max() == 255 and (img == 0).sum() >= 6 and (img == 255).sum() >= 6
    assert ds.header["source"]["format"] == "dicom"
    assert "Doe" not in json.dumps(ds.header)


@pytest.mark.parametrize("case", ["unreadable image", "csv names missing file", "phi column", "no pixel data"])
def test_cli_bad_folder_inputs_exit_2_and_leave_nothing(tmp_path, capsys, case):
    folder = tmp_path / "src"
    folder.mkdir()
    if case == "no pixel data":
        make_dicom(folder / "a.dcm", None)
        csv = write_csv(tmp_path / "l.csv", ["a.dcm,x"])
        bad = "a.dcm"
    else:
        csv = _png_folder(folder, n=4)
        if case == "unreadable image":
            (folder / "img1.png").write_bytes(b"not a png")
            bad = "img1.png"
        elif case == "csv names missing file":
            (folder / "img2.png").unlink()
            bad = "labels.csv"
        else:
            csv.write_text(csv.read_text().replace("file,label,patient_id,sex", "file,label,patient_id,email"))
            bad = "labels.csv"
    out = tmp_path / "ds"
    assert run(["ingest", str(folder), "--csv", str(csv), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("ds.tmp-*"))
