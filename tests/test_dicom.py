"""DICOM source: modality LUT, windowing, MONOCHROME1, resizing, rejections, and no header leakage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from synth.artifacts import sha256_file
from synth.data.dicom import read_dicom
from synth.errors import ConfigError, InputError

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN0042917"
BIRTH_DATE = "19610412"


def make_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    slope: float | None = None,
    intercept: float | None = None,
    center: object = None,
    width: object = None,
    photometric: str = "MONOCHROME2",
    frames: int | None = None,
    samples: int = 1,
) -> Path:
    """A minimal Secondary Capture DICOM with planted patient identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.Modality = "OT"
    if pixels is not None:
        signed = pixels.dtype.kind == "i"
        ds.Rows, ds.Columns = pixels.shape[-2:] if samples == 1 else pixels.shape[:2]
        if samples > 1:
            ds.PlanarConfiguration = 0
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = photometric
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = 1 if signed else 0
        if frames is not None:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, rows: list[str], header: str = "file,label") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def ramp(lo: int, hi: int, dtype: type = np.uint16) -> np.ndarray:
    return np.linspace(lo, hi, 16).reshape(4, 4).round().astype(dtype)


def test_min_max_when_no_window(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "a.dcm", ramp(100, 1600))
    data = read_dicom(folder, write_csv(tmp_path / "m.csv", ["a.dcm,normal"]))
    img = data.images[0]
    assert data.images.shape == (1, 4, 4) and img.dtype == np.uint8
    expected = np.rint((ramp(100, 1600).astype(float) - 100) / 1500 * 255).astype(np.uint8)
    np.testing.assert_array_equal(img, expected)
    assert data.source["windowing"] == {"min_max": 1}
    assert data.source["format"] == "dicom" and data.source["csv_sha256"] == sha256_file(tmp_path / "m.csv")


def test_rescale_slope_intercept_is_applied(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    stored = ramp(0, 100)
    make_dicom(folder / "rescaled.dcm", stored, slope=2, intercept=-100)  # → -100..100
    make_dicom(folder / "raw.dcm", stored)  # → 0..100
    csv = write_csv(tmp_path / "m.csv", ["rescaled.dcm,a", "raw.dcm,a"])
    data = read_dicom(folder, csv, window=(0.0, 200.0))  # window covers -100..100
    rescaled, raw = data.images
    np.testing.assert_array_equal(rescaled, np.rint((stored * 2.0 - 100 + 100) / 200 * 255).astype(np.uint8))
    assert rescaled.min() == 0 and rescaled.max() == 255
    assert raw.min() == 128  # stored 0 sits at the window's center when not rescaled
    assert data.source["window"] == {"center": 0.0, "width": 200.0}
    assert data.source["windowing"] == {"explicit": 2}


def test_signed_pixels_and_hounsfield_window(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    hu = np.array([[-1000, -160, 0, 40], [240, 1000, 3000, -3000]] * 2, np.int16)
    make_dicom(folder / "ct.dcm", hu, slope=1, intercept=0)
    data = read_dicom(folder, write_csv(tmp_path / "m.csv", ["ct.dcm,a"]), window=(40, 400))
    row0, row1 = data.images[0, 0], data.images[0, 1]
    assert row0.tolist() == [0, 0, round((0 + 160) / 400 * 255), round(200 / 400 * 255)]
    assert row1.tolist() == [255, 255, 255, 0]  # values outside the window clip


def test_file_window_used_and_clips(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    pixels = ramp(0, 1000)
    make_dicom(folder / "single.dcm", pixels, center=500, width=200)  # window 400..600
    make_dicom(folder / "multi.dcm", pixels, center=[500, 100], width=[200, 50])  # first pair wins
    csv = write_csv(tmp_path / "m.csv", ["single.dcm,a", "multi.dcm,a"])
    data = read_dicom(folder, csv)
    expected = np.rint(np.clip((pixels.astype(float) - 400) / 200, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(data.images[0], expected)
    np.testing.assert_array_equal(data.images[1], expected)
    assert (data.images[0] == 0).sum() > 1 and (data.images[0] == 255).sum() > 1
    assert data.source["windowing"] == {"file": 2}
    # An explicit window overrides the file's.
    wide = read_dicom(folder, csv, window=(500, 1000))
    np.testing.assert_array_equal(wide.images[0], np.rint(pixels / 1000 * 255).astype(np.uint8))


def test_unusable_file_window_falls_back_to_min_max(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "a.dcm", ramp(0, 50), center=10, width=0)
    data = read_dicom(folder, write_csv(tmp_path / "m.csv", ["a.dcm,a"]))
    assert data.images[0].min() == 0 and data.images[0].max() == 255
    assert data.source["windowing"] == {"min_max": 1}


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "m2.dcm", ramp(0, 4095))
    make_dicom(folder / "m1.dcm", ramp(0, 4095), photometric="MONOCHROME1")
    data = read_dicom(folder, write_csv(tmp_path / "m.csv", ["m2.dcm,a", "m1.dcm,a"]))
    m2, m1 = data.images.astype(int)
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255 and m2[0, 0] == 0


def test_resize_and_size_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "a.dcm", ramp(0, 100))
    make_dicom(folder / "b.dcm", np.arange(48, dtype=np.uint16).reshape(6, 8))
    csv = write_csv(tmp_path / "m.csv", ["a.dcm,a", "b.dcm,b"])
    with pytest.raises(InputError, match=r"b\.dcm: is 6×8 .*pass --size"):
        read_dicom(folder, csv)
    data = read_dicom(folder, csv, size=12)
    assert data.images.shape == (2, 12, 12) and data.source["resized_to"] == 12


def test_header_values_never_leak(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    rows = []
    for i in range(4):
        make_dicom(folder / f"s{i}.dcm", ramp(0, 100 + i), center=50, width=100)
        rows.append(f"s{i}.dcm,{'ab'[i % 2]},P{i // 2},F")
    csv = write_csv(tmp_path / "m.csv", rows, "file,label,patient_id,sex")
    data = read_dicom(folder, csv)
    assert list(data.metadata.columns) == ["image_id", "split", "label", "patient_id", "sex"]
    assert data.metadata["patient_id"].tolist() == ["P0", "P0", "P1", "P1"]  # the CSV's, not PatientID
    dumped = " ".join(
        [data.metadata.to_csv(), json.dumps(data.source), " ".join(data.notes), " ".join(data.class_names),
         data.license, data.attribution]
    )
    for secret in (PATIENT_NAME, "Doe", "Jane", PATIENT_ID, "0042917", BIRTH_DATE, "1961", "Elsewhere"):
        assert secret not in dumped


def test_not_dicom_named(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "ok.dcm", ramp(0, 10))
    (folder / "fake.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(InputError, match=r"fake\.dcm: is not a DICOM file"):
        read_dicom(folder, write_csv(tmp_path / "m.csv", ["ok.dcm,a", "fake.dcm,a"]))


def test_dicom_without_pixel_data_named(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "report.dcm", None)
    with pytest.raises(InputError, match=r"report\.dcm: DICOM file has no pixel data"):
        read_dicom(folder, write_csv(tmp_path / "m.csv", ["report.dcm,a"]))


def test_truncated_pixel_data_named(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    path = make_dicom(folder / "short.dcm", ramp(0, 10))
    from pydicom import dcmread

    ds = dcmread(path)
    ds.Rows = 40  # claims far more pixels than are stored
    ds.save_as(path)
    with pytest.raises(InputError, match=r"short\.dcm: pixel data cannot be decoded"):
        read_dicom(folder, write_csv(tmp_path / "m.csv", ["short.dcm,a"]))


def test_multiframe_and_colour_unsupported(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "multi.dcm", np.zeros((2, 4, 4), np.uint16), frames=2)
    make_dicom(folder / "rgb.dcm", np.zeros((4, 4, 3), np.uint8), photometric="RGB", samples=3)
    with pytest.raises(InputError, match=r"multi\.dcm: multi-frame DICOM \(2 frames\) is not supported"):
        read_dicom(folder, write_csv(tmp_path / "a.csv", ["multi.dcm,a"]))
    with pytest.raises(InputError, match=r"rgb\.dcm: colour DICOM \(RGB, 3 samples/pixel\) is not supported"):
        read_dicom(folder, write_csv(tmp_path / "b.csv", ["rgb.dcm,a"]))


def test_csv_rejections_through_the_reader(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    make_dicom(folder / "a.dcm", ramp(0, 10))
    with pytest.raises(InputError, match=r"absent\.csv: CSV does not exist"):
        read_dicom(folder, tmp_path / "absent.csv")
    phi = write_csv(tmp_path / "phi.csv", ["a.dcm,a,1961-04-12"], "file,label,dob")
    with pytest.raises(InputError, match=r"phi\.csv: column 'dob' looks like PHI"):
        read_dicom(folder, phi)


@pytest.mark.parametrize("window", [(40, 0), (40, -5), ("a", 1), (1, 2, 3), (float("nan"), 10)])
def test_bad_window(tmp_path: Path, window: tuple) -> None:
    with pytest.raises(ConfigError, match="--window"):
        read_dicom(tmp_path, tmp_path / "m.csv", window=window)
