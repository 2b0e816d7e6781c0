"""Image folder source: modes, channels, resizing, metadata and rejections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.artifacts import sha256_file
from synth.data.imagefolder import read_imagefolder, resize_square
from synth.data.manifest import image_id_for
from synth.data.sources import SourceData
from synth.errors import ConfigError, InputError


def save(folder: Path, name: str, arr: np.ndarray, mode: str | None = None, **kw: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    image.save(folder / name, **kw)


def write_csv(path: Path, rows: list[str], header: str = "file,label") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def gray(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def test_grayscale_pngs(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(4)]
    for i, arr in enumerate(arrays):
        save(folder, f"c{i % 2}/x{i}.png", arr)
    csv = write_csv(
        tmp_path / "m.csv", [f"c{i % 2}/x{i}.png,{'normal' if i % 2 == 0 else 'pneumonia'}" for i in range(4)],
    )
    data = read_imagefolder(folder, csv)
    assert isinstance(data, SourceData)
    assert data.images.dtype == np.uint8 and data.images.shape == (4, 12, 12)
    np.testing.assert_array_equal(data.images, np.stack(arrays))
    assert data.class_names == ["normal", "pneumonia"]
    assert data.metadata["label"].tolist() == [0, 1, 0, 1]
    assert data.metadata["image_id"].tolist() == [image_id_for(f"c{i % 2}/x{i}.png") for i in range(4)]
    assert data.source == {
        "format": "imagefolder",
        "csv": "m.csv",
        "csv_sha256": sha256_file(csv),
        "split_method": "by_image",
        "split_seed": 0,
        "split_fractions": [0.8, 0.1, 0.1],
        "resized_to": None,
        "channels": 1,
        "files": 4,
    }


def test_metadata_rows_follow_images(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = []
    for i in range(6):
        save(folder, f"{i}.png", gray(40 * i))
        rows.append(f"{i}.png,{i % 3},PAT{i // 2},{'FM'[i % 2]},{['train', 'val', 'test'][i % 3]}")
    csv = write_csv(tmp_path / "m.csv", rows, "file,label,patient_id,sex,split")
    data = read_imagefolder(folder, csv)
    assert list(data.metadata.columns) == ["image_id", "split", "label", "patient_id", "sex"]
    assert data.images[:, 0, 0].tolist() == [0, 40, 80, 120, 160, 200]
    assert data.metadata["label"].tolist() == [0, 1, 2, 0, 1, 2]
    assert data.metadata["patient_id"].tolist() == ["PAT0", "PAT0", "PAT1", "PAT1", "PAT2", "PAT2"]
    assert data.metadata["split"].tolist() == ["train", "val", "test"] * 2
    assert data.source["split_method"] == "column"


def test_rgb_and_gray_mix_gives_three_channels(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 100, 200
    save(folder, "rgb.png", rgb)
    save(folder, "gray.png", gray(77))
    csv = write_csv(tmp_path / "m.csv", ["rgb.png,a", "gray.png,a"])
    data = read_imagefolder(folder, csv)
    assert data.images.shape == (2, 8, 8, 3) and data.source["channels"] == 3
    np.testing.assert_array_equal(data.images[0], rgb)
    assert (data.images[1] == 77).all()
    assert any("replicated to 3 channels" in n for n in data.notes)

    forced = read_imagefolder(folder, csv, channels=1)
    assert forced.images.shape == (2, 8, 8)
    luma = round(0.299 * 10 + 0.587 * 100 + 0.114 * 200)
    assert abs(int(forced.images[0, 0, 0]) - luma) <= 1
    assert (forced.images[1] == 77).all()


def test_rgb_with_equal_channels_counts_as_grayscale(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    arr = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    save(folder, "a.png", np.repeat(arr[..., None], 3, axis=2))
    save(folder, "b.jpg", np.repeat(arr[..., None], 3, axis=2), quality=95)
    csv = write_csv(tmp_path / "m.csv", ["a.png,x", "b.jpg,x"])
    data = read_imagefolder(folder, csv)
    assert data.images.shape == (2, 8, 8)
    np.testing.assert_array_equal(data.images[0], arr)
    forced = read_imagefolder(folder, csv, channels=3)
    assert forced.images.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(forced.images[0, ..., 2], arr)


def test_sixteen_bit_png_scaled_by_its_range(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    arr = np.linspace(1000, 41000, 64).reshape(8, 8).astype(np.uint16)
    save(folder, "deep.png", arr)
    assert Image.open(folder / "deep.png").mode.startswith("I")
    data = read_imagefolder(folder, write_csv(tmp_path / "m.csv", ["deep.png,a"]))
    img = data.images[0]
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    expected = np.rint((arr.astype(float) - 1000) * 255 / 40000).astype(np.uint8)
    np.testing.assert_array_equal(img, expected)
    assert any("high-bit-depth" in n for n in data.notes)


def test_alpha_and_palette_images(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :4, 3] = 255  # left half opaque, right half fully transparent
    save(folder, "rgba.png", rgba, "RGBA")
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[..., 1] = 100, 128
    save(folder, "la.png", la, "LA")
    pal = Image.fromarray(np.tile(np.array([[0, 1]], np.uint8), (8, 4)), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(folder / "pal.png")
    data = read_imagefolder(folder, write_csv(tmp_path / "m.csv", ["rgba.png,a", "la.png,a", "pal.png,a"]))
    assert data.images.shape == (3, 8, 8)  # all three are gray in content
    assert (data.images[0, :, :4] == 200).all() and (data.images[0, :, 4:] == 0).all()
    assert (data.images[1] == round(100 * 128 / 255)).all()
    assert data.images[2, 0, :4].tolist() == [0, 255, 0, 255]
    assert any("transparency" in n for n in data.notes)


def test_resize_center_crops_then_resizes(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 200  # the central 20×20 square
    save(folder, "wide.png", wide)
    tall = np.zeros((30, 10, 3), np.uint8)
    tall[10:20] = (255, 0, 0)
    save(folder, "tall.png", tall)
    csv = write_csv(tmp_path / "m.csv", ["wide.png,a", "tall.png,b"])
    data = read_imagefolder(folder, csv, size=10)
    assert data.images.shape == (2, 10, 10, 3) and data.source["resized_to"] == 10
    assert (data.images[0] == 200).all()
    assert (data.images[1] == (255, 0, 0)).all()
    assert any("center-cropped" in n for n in data.notes)
    up = read_imagefolder(folder, csv, size=32, channels=1)
    assert up.images.shape == (2, 32, 32)


def test_resize_square_filters() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = resize_square(checker, 8)
    assert small.shape == (8, 8) and abs(float(small.mean()) - 127.5) < 3  # anti-aliased, not sampled
    np.testing.assert_array_equal(resize_square(checker, 64), checker)  # already the size: untouched


def test_different_sizes_need_size(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    save(folder, "a.png", gray(1, 8, 8))
    save(folder, "b.png", gray(1, 8, 9))
    csv = write_csv(tmp_path / "m.csv", ["a.png,x", "b.png,x"])
    with pytest.raises(InputError, match=r"b\.png: is 8×9 .*pass --size"):
        read_imagefolder(folder, csv)
    assert read_imagefolder(folder, csv, size=8).images.shape == (2, 8, 8)


def test_unreadable_image_named(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    save(folder, "good.png", gray(5))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("hello")
    for name in ("broken.png", "truncated.png", "text.jpg"):
        csv = write_csv(tmp_path / "m.csv", ["good.png,a", f"{name},a"])
        with pytest.raises(InputError, match=rf"{name}: cannot be read as an image"):
            read_imagefolder(folder, csv)


def test_multiframe_image_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = [Image.fromarray(gray(v)) for v in (0, 255)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match=r"anim\.gif: has 2 frames"):
        read_imagefolder(folder, write_csv(tmp_path / "m.csv", ["anim.gif,a"]))


def test_bad_csv_inputs_through_the_reader(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    save(folder, "a.png", gray(1))
    with pytest.raises(InputError, match=r"missing\.csv: CSV does not exist"):
        read_imagefolder(folder, tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.csv: CSV is empty"):
        read_imagefolder(folder, empty)
    named = write_csv(tmp_path / "phi.csv", ["a.png,x,Jane Doe"], "file,label,patient_name")
    with pytest.raises(InputError, match=r"phi\.csv: column 'patient_name' looks like PHI") as e:
        read_imagefolder(folder, named)
    assert "Jane" not in str(e.value)
    missing = write_csv(tmp_path / "gone.csv", ["a.png,x", "b.png,x"])
    with pytest.raises(InputError, match=r"gone\.csv: 1 of 2 file\(s\) not found .*b\.png"):
        read_imagefolder(folder, missing)


@pytest.mark.parametrize(
    ("kw", "flag"), [({"size": 0}, "--size"), ({"size": 2.5}, "--size"), ({"channels": 2}, "--channels")]
)
def test_bad_arguments(tmp_path: Path, kw: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        read_imagefolder(tmp_path, tmp_path / "m.csv", **kw)


def test_output_writes_as_a_canonical_dataset(tmp_path: Path) -> None:
    from synth.data.canonical import load_dataset, write_dataset

    folder = tmp_path / "imgs"
    for i in range(5):
        save(folder, f"{i}.png", gray(50 * i))
    csv = write_csv(tmp_path / "m.csv", [f"{i}.png,{i % 2},PAT{i},site{i % 2}" for i in range(5)],
                    "file,label,patient_id,site")
    data = read_imagefolder(folder, csv)
    out = write_dataset(tmp_path / "ds", data.images, data.metadata, class_names=data.class_names,
                        source=data.source)
    ds = load_dataset(out, verify=True)
    assert ds.header["source"]["split_method"] == "by_patient"
    assert ds.header["attributes"] == ["site"] and ds.header["has_patient_id"]
    np.testing.assert_array_equal(np.asarray(ds.images), data.images)
