"""The CSV manifest: columns, labels, splits, attributes and every rejection."""

from __future__ import annotations

from pathlib import Path

import pytest

from synth.artifacts import sha256_file
from synth.data.manifest import assign_splits, image_id_for, read_manifest
from synth.errors import ConfigError, InputError


def make_folder(root: Path, names: list[str]) -> Path:
    folder = root / "images"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    folder.mkdir(exist_ok=True)
    return folder


def write_csv(root: Path, text: str, name: str = "labels.csv") -> Path:
    path = root / name
    path.write_text(text)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path, [f"img{i}.png" for i in range(10)] + ["sub/deep.png"])


def test_basic_columns_labels_attributes(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(
        tmp_path,
        "file,label,sex,age_group\n"
        "img0.png,pneumonia,F,40-49\n"
        "./img1.png,normal,,60-69\n"
        "sub/deep.png, normal ,M,NA\n",
    )
    m = read_manifest(csv, folder)
    assert m.class_names == ["normal", "pneumonia"]
    assert list(m.frame.columns) == ["file", "label", "split", "sex", "age_group"]
    assert m.frame["file"].tolist() == ["img0.png", "img1.png", "sub/deep.png"]
    assert m.frame["label"].tolist() == [1, 0, 0]
    assert m.frame["sex"].tolist() == ["F", "unknown", "M"]
    assert m.frame["age_group"].tolist() == ["40-49", "60-69", "unknown"]
    assert m.attributes == ["sex", "age_group"]
    assert m.paths == [folder.absolute() / f for f in ("img0.png", "img1.png", "sub/deep.png")]
    assert all(p.is_absolute() for p in m.paths)
    assert m.csv_sha256 == sha256_file(csv)
    assert m.split_method == "by_image"
    info = m.source_info()
    assert info["csv"] == "labels.csv" and info["split_method"] == "by_image" and info["split_seed"] == 0

    meta = m.metadata()
    assert list(meta.columns) == ["image_id", "split", "label", "sex", "age_group"]
    assert meta["image_id"].tolist() == [image_id_for(f) for f in ["img0.png", "img1.png", "sub/deep.png"]]
    assert meta["image_id"].nunique() == 3
    assert meta["label"].dtype == "int64"


def test_image_id_is_from_path_not_patient_and_hides_file_name(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,patient_id\nimg0.png,a,P1\nimg1.png,a,P1\n")
    meta = read_manifest(csv, folder).metadata()
    assert meta["image_id"].nunique() == 2
    assert not any("img" in i or "P1" in i for i in meta["image_id"])
    assert meta["patient_id"].tolist() == ["P1", "P1"]
    again = read_manifest(csv, folder, seed=5).metadata()
    assert again["image_id"].tolist() == meta["image_id"].tolist()


@pytest.mark.parametrize("column", ["file", "file_name", "path", "File"])
def test_accepted_file_columns(tmp_path: Path, folder: Path, column: str) -> None:
    csv = write_csv(tmp_path, f"{column},label\nimg0.png,a\nimg1.png,b\n")
    assert read_manifest(csv, folder).frame["file"].tolist() == ["img0.png", "img1.png"]


def test_integer_labels_sorted_numerically(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label\nimg0.png,10\nimg1.png,2\nimg2.png,1\nimg3.png,02\n")
    m = read_manifest(csv, folder)
    assert m.class_names == ["1", "2", "10"]
    assert m.frame["label"].tolist() == [2, 1, 0, 1]


def test_given_class_names_by_name_and_by_index(tmp_path: Path, folder: Path) -> None:
    by_name = write_csv(tmp_path, "file,label\nimg0.png,pneumonia\nimg1.png,normal\n", "a.csv")
    m = read_manifest(by_name, folder, class_names=["normal", "pneumonia", "covid"])
    assert m.class_names == ["normal", "pneumonia", "covid"]
    assert m.frame["label"].tolist() == [1, 0]
    by_index = write_csv(tmp_path, "file,label\nimg0.png,1\nimg1.png,0\n", "b.csv")
    assert read_manifest(by_index, folder, class_names=["normal", "pneumonia"]).frame["label"].tolist() == [1, 0]
    out_of_range = write_csv(tmp_path, "file,label\nimg0.png,1\nimg1.png,2\n", "c.csv")
    with pytest.raises(InputError, match=r"c\.csv: line 3: label index 2 is out of range"):
        read_manifest(out_of_range, folder, class_names=["normal", "pneumonia"])


def test_label_not_in_class_names(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label\nimg0.png,normal\nimg1.png,covid\n")
    with pytest.raises(InputError, match=r"labels\.csv: line 3: label 'covid' is not one of the class names"):
        read_manifest(csv, folder, class_names=["normal", "pneumonia"])


def test_split_column_used(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,split\nimg0.png,a,train\nimg1.png,a,Validation\nimg2.png,b,TEST\n")
    m = read_manifest(csv, folder)
    assert m.split_method == "column"
    assert m.frame["split"].tolist() == ["train", "val", "test"]
    assert "split_seed" not in m.source_info()


def test_split_column_patient_spanning_splits_is_noted(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,patient_id,split\nimg0.png,a,P1,train\nimg1.png,a,P1,test\n")
    m = read_manifest(csv, folder)
    assert any("more than one split" in n for n in m.notes)


def test_bad_split_value(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,split\nimg0.png,a,train\nimg1.png,a,holdout\n")
    with pytest.raises(InputError, match=r"labels\.csv: line 3: split 'holdout' is not one of train, val, test"):
        read_manifest(csv, folder)


def _patient_csv(tmp_path: Path, n_patients: int = 40) -> tuple[Path, Path]:
    names, rows = [], []
    for p in range(n_patients):
        for k in range(1 + p % 3):  # 1 to 3 images per patient
            name = f"p{p}_{k}.png"
            names.append(name)
            rows.append(f"{name},{'ab'[p % 2]},PAT{p:03d},site{p % 4}")
    folder = make_folder(tmp_path, names)
    return write_csv(tmp_path, "file,label,patient_id,site\n" + "\n".join(rows) + "\n"), folder


def test_patient_level_split_keeps_patients_whole_and_is_deterministic(tmp_path: Path) -> None:
    csv, folder = _patient_csv(tmp_path)
    m = read_manifest(csv, folder, seed=3)
    assert m.split_method == "by_patient"
    assert m.frame.groupby("patient_id")["split"].nunique().max() == 1
    counts = m.frame["split"].value_counts()
    n = len(m.frame)
    assert set(counts.index) == {"train", "val", "test"}
    assert abs(counts["train"] / n - 0.8) < 0.08
    assert m.source_info()["split_fractions"] == [0.8, 0.1, 0.1]

    same = read_manifest(csv, folder, seed=3)
    assert same.frame["split"].tolist() == m.frame["split"].tolist()
    other = read_manifest(csv, folder, seed=4)
    assert other.frame.groupby("patient_id")["split"].nunique().max() == 1
    assert other.frame["split"].tolist() != m.frame["split"].tolist()


def test_image_level_split_hits_fractions(tmp_path: Path, folder: Path) -> None:
    rows = "\n".join(f"img{i}.png,a" for i in range(10))
    csv = write_csv(tmp_path, "file,label\n" + rows + "\n")
    m = read_manifest(csv, folder, seed=1)
    assert m.frame["split"].value_counts().to_dict() == {"train": 8, "val": 1, "test": 1}
    assert read_manifest(csv, folder, seed=1).frame["split"].tolist() == m.frame["split"].tolist()
    half = read_manifest(csv, folder, seed=1, fractions=(0.5, 0.5, 0.0))
    assert half.frame["split"].value_counts().to_dict() == {"train": 5, "val": 5}


def test_assign_splits_groups_keys() -> None:
    keys = ["a", "a", "b", "c", "c", "c", "d"]
    out = assign_splits(keys, seed=0, fractions=(0.5, 0.25, 0.25))
    assert out[0] == out[1] and out[3] == out[4] == out[5]
    assert out == assign_splits(keys, seed=0, fractions=(0.5, 0.25, 0.25))


def test_empty_split_is_noted(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,patient_id\nimg0.png,a,P1\nimg1.png,a,P1\n")
    m = read_manifest(csv, folder)
    assert any("is empty" in n for n in m.notes)


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.9, 0.2, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions(tmp_path: Path, folder: Path, fractions: tuple[float, ...]) -> None:
    csv = write_csv(tmp_path, "file,label\nimg0.png,a\n")
    with pytest.raises(ConfigError, match="fractions"):
        read_manifest(csv, folder, fractions=fractions)


# --- rejections: each names the CSV (or the folder) and the problem -----------------------------------------


def test_missing_csv(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: CSV does not exist"):
        read_manifest(tmp_path / "nope.csv", folder)


def test_zero_byte_csv(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "")
    with pytest.raises(InputError, match=r"labels\.csv: CSV is empty \(0 bytes\)"):
        read_manifest(csv, folder)


def test_csv_is_a_directory(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(InputError, match="CSV is not a file"):
        read_manifest(folder, folder)


def test_unparseable_csv(tmp_path: Path, folder: Path) -> None:
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00garbage")
    with pytest.raises(InputError, match=r"binary\.csv: cannot be parsed as CSV"):
        read_manifest(binary, folder)
    ragged = write_csv(tmp_path, "file,label\nimg0.png,a,extra,more\nimg1.png,b\n", "ragged.csv")
    with pytest.raises(InputError, match=r"ragged\.csv: cannot be parsed as CSV"):
        read_manifest(ragged, folder)
    blank = write_csv(tmp_path, "\n\n", "blank.csv")
    with pytest.raises(InputError, match=r"blank\.csv: CSV has no header row"):
        read_manifest(blank, folder)


def test_header_only(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label\n")
    with pytest.raises(InputError, match=r"labels\.csv: CSV has no rows"):
        read_manifest(csv, folder)


def test_missing_folder(tmp_path: Path) -> None:
    csv = write_csv(tmp_path, "file,label\na.png,x\n")
    with pytest.raises(InputError, match="image folder does not exist"):
        read_manifest(csv, tmp_path / "absent")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("image,label\nimg0.png,a\n", "missing the file column"),
        ("file,class\nimg0.png,a\n", "missing the 'label' column"),
        ("file,path,label\nimg0.png,img0.png,a\n", "more than one file column"),
        ("file,label,label\nimg0.png,a,a\n", "repeated column name"),
        ("file,label,image_id\nimg0.png,a,7\n", "reserved"),
        ("file,label,,\nimg0.png,a,,oops\n", "column 4 has values but no name"),
    ],
)
def test_bad_columns(tmp_path: Path, folder: Path, text: str, problem: str) -> None:
    csv = write_csv(tmp_path, text)
    with pytest.raises(InputError, match=r"labels\.csv: .*" + problem):
        read_manifest(csv, folder)


def test_trailing_empty_columns_are_dropped(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,,\nimg0.png,a,,\n")
    assert read_manifest(csv, folder).attributes == []


@pytest.mark.parametrize(
    ("column", "kind"),
    [("patient_name", "name"), ("dob", "date of birth"), ("MRN", "medical record number"), ("email", "e-mail")],
)
def test_phi_column_by_name(tmp_path: Path, folder: Path, column: str, kind: str) -> None:
    csv = write_csv(tmp_path, f"file,label,{column}\nimg0.png,a,SECRETVALUE\nimg1.png,b,SECRETVALUE\n")
    expected = rf"labels\.csv: column '{column}' looks like PHI \({kind}, by its name\)"
    with pytest.raises(InputError, match=expected) as e:
        read_manifest(csv, folder)
    assert "SECRETVALUE" not in str(e.value)


def test_phi_column_by_value(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,contact\nimg0.png,a,jane.doe@example.org\nimg1.png,b,j.smith@example.org\n")
    expected = r"labels\.csv: column 'contact' looks like PHI \(e-mail, by its values\)"
    with pytest.raises(InputError, match=expected) as e:
        read_manifest(csv, folder)
    assert "example.org" not in str(e.value) and "jane" not in str(e.value)


def test_patient_id_that_is_a_date_is_phi(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label,patient_id\nimg0.png,a,1961-04-12\nimg1.png,b,1970-01-30\n")
    with pytest.raises(InputError, match=r"column 'patient_id' looks like PHI \(date, by its values\)") as e:
        read_manifest(csv, folder)
    assert "1961" not in str(e.value)


def test_missing_files_named_with_count(tmp_path: Path, folder: Path) -> None:
    rows = "\n".join(f"gone{i}.png,a" for i in range(5))
    csv = write_csv(tmp_path, "file,label\nimg0.png,a\n" + rows + "\n")
    with pytest.raises(InputError, match=r"labels\.csv: 5 of 6 file\(s\) not found in .*gone0\.png, gone1\.png, "
                       r"gone2\.png and 2 more"):
        read_manifest(csv, folder)


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside.png", "sub/../../outside.png", "C:\\x.png", "."])
def test_paths_escaping_the_folder(tmp_path: Path, folder: Path, value: str) -> None:
    csv = write_csv(tmp_path, f"file,label\nimg0.png,a\n{value},a\n")
    with pytest.raises(InputError, match=r"labels\.csv: line 3: file .* is absolute or leaves the image folder"):
        read_manifest(csv, folder)


def test_duplicate_file_entries(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label\nimg0.png,a\n./img0.png,b\nimg1.png,a\n")
    with pytest.raises(InputError, match=r"labels\.csv: 1 file\(s\) listed more than once: img0\.png"):
        read_manifest(csv, folder)


def test_empty_labels(tmp_path: Path, folder: Path) -> None:
    csv = write_csv(tmp_path, "file,label\nimg0.png,a\nimg1.png,\nimg2.png, \n")
    with pytest.raises(InputError, match=r"labels\.csv: empty label in line 3, line 4"):
        read_manifest(csv, folder)


def test_empty_file_entry_and_patient_id(tmp_path: Path, folder: Path) -> None:
    no_file = write_csv(tmp_path, "file,label\n,a\n", "a.csv")
    with pytest.raises(InputError, match=r"a\.csv: empty file entry in line 2"):
        read_manifest(no_file, folder)
    no_pid = write_csv(tmp_path, "file,label,patient_id\nimg0.png,a,P1\nimg1.png,a,\n", "b.csv")
    with pytest.raises(InputError, match=r"b\.csv: empty patient_id in line 3"):
        read_manifest(no_pid, folder)


def test_identifier_like_attribute_is_noted(tmp_path: Path) -> None:
    names = [f"i{k}.png" for k in range(25)]
    folder = make_folder(tmp_path, names)
    csv = write_csv(tmp_path, "file,label,accession\n" + "\n".join(f"{n},a,ACC{k}" for k, n in enumerate(names)))
    assert any("'accession'" in n for n in read_manifest(csv, folder).notes)
