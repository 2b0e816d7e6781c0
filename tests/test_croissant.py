"""croissant.json: Croissant 1.1 + RAI, valid for mlcroissant, records loaded offline from the bundle's files."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.bundle import png_pixels
from reports.croissant import (
    CONFORMS_TO,
    build_croissant,
    croissant_issues,
    croissant_records,
    validate_croissant,
)
from reports.facts import PrivacyFacts
from synth.artifacts import sha256_file
from tests.release_fixtures import build_bundle

RAI_FIELDS = (
    "rai:dataCollection",
    "rai:dataBiases",
    "rai:personalSensitiveInformation",
    "rai:dataUseCases",
    "rai:dataLimitations",
    "rai:dataManipulationProtocol",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root, _, _ = build_bundle(tmp_path_factory.mktemp("croissant"), per_class=3)
    return root


def _doc(root: Path) -> dict:
    return json.loads((root / "croissant.json").read_text())


def test_croissant_is_1_1_with_rai_fields(bundle):
    doc = _doc(bundle)
    assert doc["conformsTo"] == CONFORMS_TO == "http://mlcommons.org/croissant/1.1"
    for key in RAI_FIELDS:
        assert doc[key], key
    text = (bundle / "croissant.json").read_text()
    # The RAI vocabulary's spelling, not mlcroissant 1.1.1's `dataDataManipulationProtocol`.
    assert '"rai:dataManipulationProtocol"' in text and "dataDataManipulationProtocol" not in text
    assert "ε = 7.93" in doc["rai:dataManipulationProtocol"]
    assert "auto-approved (scripted run), no human review" in doc["rai:dataManipulationProtocol"]
    assert doc["license"] == "https://creativecommons.org/licenses/by/4.0/"


def test_distribution_hashes_and_globs_match_the_files(bundle):
    doc = _doc(bundle)
    csv_obj, pngs = doc["distribution"]
    assert csv_obj["@type"] == "cr:FileObject" and csv_obj["contentUrl"] == "data/train/metadata.csv"
    assert csv_obj["sha256"] == sha256_file(bundle / "data/train/metadata.csv")
    assert pngs["@type"] == "cr:FileSet" and pngs["encodingFormat"] == "image/png"
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*.png"))
    assert on_disk and all(fnmatch.fnmatch(p, pngs["includes"]) for p in on_disk)
    fields = {f["name"] for f in doc["recordSet"][1]["field"]}
    assert fields == {"file_name", "image", "label", "image_id", "seed", "sex"}


def test_mlcroissant_validates_without_errors_or_warnings(bundle):
    assert validate_croissant(bundle / "croissant.json") == []
    assert validate_croissant(bundle / "croissant.json", strict=True) == []


def test_records_load_offline_and_match_the_files(bundle):
    table = pd.read_csv(bundle / "data/train/metadata.csv", dtype={"image_id": str, "sex": str})
    records = croissant_records(bundle / "croissant.json")
    assert len(records) == len(table) == 6
    rows = table.set_index("file_name")
    for rec in records:
        row = rows.loc[rec["file_name"]]
        assert rec["label"] == row["label"] and rec["image_id"] == row["image_id"] and rec["sex"] == row["sex"]
        assert rec["seed"] == row["seed"]
        pixels = np.asarray(rec["image"].convert("L"))
        assert np.array_equal(pixels, png_pixels(bundle / "data/train" / rec["file_name"]))
    classes = croissant_records(bundle / "croissant.json", "classes")
    assert [(c["index"], c["name"]) for c in classes] == [(0, "normal"), (1, "pneumonia")]


def _write(tmp_path: Path, bundle: Path, doc: dict) -> Path:
    # A copy of the bundle's data beside a modified croissant.json (relative paths must still resolve).
    root = tmp_path / "copy"
    if not root.exists():
        import shutil

        shutil.copytree(bundle, root)
    (root / "croissant.json").write_text(json.dumps(doc))
    return root / "croissant.json"


def test_validation_reports_broken_metadata(tmp_path, bundle):
    doc = _doc(bundle)
    old = dict(doc, conformsTo="http://mlcommons.org/croissant/1.0")
    assert any("conformsTo" in e for e in validate_croissant(_write(tmp_path, bundle, old)))

    dangling = json.loads(json.dumps(doc))
    dangling["distribution"] = dangling["distribution"][1:]  # metadata.csv FileObject gone, still referenced
    assert any('"metadata-csv"' in e for e in validate_croissant(_write(tmp_path, bundle, dangling)))

    untyped = json.loads(json.dumps(doc))
    del untyped["recordSet"][1]["field"][2]["dataType"]  # label without a data type
    errors, _ = croissant_issues(_write(tmp_path, bundle, untyped))
    assert any("Field(label)" in e and "dataType" in e for e in errors)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert validate_croissant(bad) == [f"{bad}: not valid JSON (JSONDecodeError)"]
    assert validate_croissant(tmp_path / "missing.json")


def test_not_dp_release_says_so(tmp_path, bundle):
    _, _, facts = build_bundle(tmp_path, per_class=1)
    doc = build_croissant(facts.model_copy(update={"privacy": PrivacyFacts.not_private()}), tmp_path / "bundle/data")
    assert "not differentially private" in doc["rai:dataManipulationProtocol"]
    assert "differential privacy" not in doc["keywords"]
