"""The bundle's content: imagefolder layout that `datasets` and ImageFolder read right, deterministic PNGs,
only synthetic pixels, report copy."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.bundle import png_bytes, png_pixels, write_bundle_content
from reports.bundle_layout import class_folder_names, imagefolder_indices
from reports.dataset_card import parse_card_header
from reports.facts import SyntheticFacts
from reports.synthetic_mark import DIGITAL_SOURCE_TYPE, xmp_packet
from synth.data.canonical import load_dataset, pixel_sha256
from synth.errors import InputError, IntegrityError, PolicyBlocked
from tests.release_fixtures import build_bundle, demo_facts, make_synthetic


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    b, syn, _ = build_bundle(tmp_path_factory.mktemp("bundle"), per_class=5)
    return b, syn


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory):
    """`datasets`, offline, with its caches in a temporary folder."""
    home = tmp_path_factory.mktemp("hf")
    mp = pytest.MonkeyPatch()
    for var, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}.items():
        mp.setenv(var, value)
    import datasets

    # In case `datasets` was imported earlier in the session, before the environment was set.
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    datasets.disable_progress_bars()
    yield datasets, home / "cache"
    mp.undo()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _csv(bundle: Path) -> pd.DataFrame:
    return pd.read_csv(bundle / "data/train/metadata.csv", dtype={"image_id": str, "sex": str})


def test_layout_and_returned_paths(tmp_path):
    syn = make_synthetic(tmp_path / "syn", per_class=3)
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    root = tmp_path / "b"
    root.mkdir()
    written = write_bundle_content(root, synthetic_dir=syn, public_report_dir=None, facts=facts)
    assert written == _files(root)
    assert {"README.md", "datasheet.md", "croissant.json", "data/train/metadata.csv"} <= set(written)
    pngs = [w for w in written if w.endswith(".png")]
    assert len(pngs) == 6
    assert sorted(os.listdir(root / "data/train")) == ["0_normal", "1_pneumonia", "metadata.csv"]
    assert "data/train/0_normal/syn-000000.png" in pngs and "data/train/1_pneumonia/syn-000001.png" in pngs


def test_metadata_csv_and_pngs_hold_the_synthetic_pixels(bundle):
    root, syn = bundle
    ds = load_dataset(syn)
    table = _csv(root)
    assert list(table.columns) == ["file_name", "label", "image_id", "seed", "sex"]
    assert len(table) == len(ds.metadata) == 10
    by_id = {iid: i for i, iid in enumerate(ds.metadata["image_id"])}
    for row in table.itertuples():
        i = by_id[row.image_id]
        assert row.label == ds.metadata["label"].iloc[i]
        assert row.seed == ds.metadata["seed"].iloc[i] and row.sex == ds.metadata["sex"].iloc[i]
        assert np.array_equal(png_pixels(root / "data/train" / row.file_name), ds.images[i])


def test_every_released_png_is_marked_synthetic_in_xmp(bundle):
    """Read back with libraries (Pillow's XMP reader; a namespace-aware XML parse), not by grepping bytes."""
    from defusedxml import ElementTree
    from PIL import Image

    root, _ = bundle
    pngs = sorted((root / "data").rglob("*.png"))
    assert len(pngs) == 10
    for path in pngs:
        with Image.open(path) as im:
            desc = im.getxmp()["xmpmeta"]["RDF"]["Description"]
            packet = im.info["xmp"]
        assert desc["DigitalSourceType"] == DIGITAL_SOURCE_TYPE
        assert desc["ReleaseID"] == "rel-demo-001"
        assert "synthetic" in desc["description"]["Alt"]["li"]["text"].lower()
        tree = ElementTree.fromstring(packet)
        rdf = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
        node = tree.find(f"{rdf}RDF/{rdf}Description")
        assert node.get("{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}DigitalSourceType") == (
            "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia")


def test_imagefolder_rule_gives_true_labels(bundle):
    root, _ = bundle
    train = root / "data/train"
    folders = [p.name for p in train.iterdir() if p.is_dir()]
    index = imagefolder_indices(folders)  # what torchvision's ImageFolder assigns: sorted names -> 0..n-1
    table = _csv(root).set_index("file_name")
    n = 0
    for folder in folders:
        for png in (train / folder).iterdir():
            assert index[folder] == table.loc[f"{folder}/{png.name}", "label"]
            n += 1
    assert n == len(table)


@pytest.mark.parametrize(
    "names",
    [["zebra", "apple"], [f"class {c}" for c in "abcdefghijkl"][::-1], ["Pneumonia", "normal", "COVID-19"]],
    ids=["reverse-alpha", "twelve-classes", "mixed-case"],
)
def test_folder_names_sort_in_label_order(names):
    folders = class_folder_names(names)
    assert sorted(folders) == folders
    assert imagefolder_indices(folders) == {f: i for i, f in enumerate(folders)}
    assert len(set(folders)) == len(names)


def _chunks(data: bytes) -> list[str]:
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos + 4 : pos + 8].decode())
        pos += 12 + length
    return chunks


def test_png_bytes_are_deterministic_and_carry_no_metadata():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for img in (gray, rgb, gray[..., None]):
        data = png_bytes(img)
        assert data == png_bytes(img.copy())
        chunks = _chunks(data)
        assert chunks[0] == "IHDR" and chunks[-1] == "IEND"
        assert set(chunks) <= {"IHDR", "IDAT", "IEND"}, chunks  # no tIME / tEXt / iTXt
        marked = png_bytes(img, xmp=xmp_packet("r-1"))
        assert marked == png_bytes(img.copy(), xmp=xmp_packet("r-1"))
        assert set(_chunks(marked)) - set(chunks) == {"iTXt"}  # the mark and nothing else
    with pytest.raises(InputError):
        png_bytes(rng.random((4, 4)))


def test_same_inputs_same_bundle_bytes(tmp_path):
    syn = make_synthetic(tmp_path / "syn", per_class=3)
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    roots = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        write_bundle_content(root, synthetic_dir=syn, public_report_dir=None, facts=facts)
        roots.append(root)
    assert _files(roots[0]) == _files(roots[1])
    for rel in _files(roots[0]):
        assert (roots[0] / rel).read_bytes() == (roots[1] / rel).read_bytes(), rel


def test_datasets_imagefolder_loads_labels_and_class_names(bundle, hf_datasets, caplog):
    datasets, cache = hf_datasets
    root, _ = bundle
    table = _csv(root)
    labels = dict(zip(table["image_id"], table["label"], strict=True))

    # 1. From the data folder: labels come from metadata.csv (folder names are ignored), as integers.
    plain = datasets.load_dataset("imagefolder", data_dir=str(root / "data"), split="train", cache_dir=str(cache))
    assert plain.num_rows == len(table)
    assert {r["image_id"]: r["label"] for r in plain} == labels
    assert plain[0]["image"].size == (28, 28)

    # 2. With the features the card declares: label is a ClassLabel with the names in label order.
    header = parse_card_header((root / "README.md").read_text())
    features = datasets.Features._from_yaml_list(header["dataset_info"]["features"])
    typed = datasets.load_dataset(
        "imagefolder", data_dir=str(root / "data"), split="train", features=features, cache_dir=str(cache)
    )
    assert typed.features["label"].names == ["normal", "pneumonia"]
    assert {r["image_id"]: r["label"] for r in typed} == labels

    # 3. As the card says: the cast_column snippet.
    cast = plain.cast_column("label", datasets.ClassLabel(names=["normal", "pneumonia"]))
    assert cast.features["label"].int2str(1) == "pneumonia"

    # 4. The bundle root as a dataset repository: the card's YAML configs + features are used, without a warning
    # about the card (its `splits` need name, num_examples and num_bytes).
    datasets.utils.logging.enable_propagation()  # `datasets` logs to its own, non-propagating logger
    try:
        with caplog.at_level(logging.WARNING, logger="datasets"):
            repo = datasets.load_dataset(str(root), split="train", cache_dir=str(cache))
    finally:
        datasets.utils.logging.disable_propagation()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("datasets")]
    header = parse_card_header((root / "README.md").read_text())
    png_bytes_total = sum(p.stat().st_size for p in (root / "data" / "train").rglob("*.png"))
    assert header["dataset_info"]["splits"] == [{"name": "train", "num_bytes": png_bytes_total, "num_examples": 10}]
    assert repo.features["label"].names == ["normal", "pneumonia"]
    assert {r["image_id"]: r["label"] for r in repo} == labels
    assert set(repo.column_names) == {"image", "label", "image_id", "seed", "sex"}


# --- only synthetic pixels ------------------------------------------------------------------------------


def _bundle_png_hashes(root: Path) -> set[str]:
    return {pixel_sha256(png_pixels(p)[None])[0] for p in root.rglob("*.png")}


def test_no_real_training_image_in_a_real_free_bundle(tmp_path, pneumonia_slice):
    real = load_dataset(pneumonia_slice)
    real_hashes = set(real.metadata["sha256"])
    root, syn, _ = build_bundle(tmp_path, per_class=8)
    bundle_hashes = _bundle_png_hashes(root)
    assert len(bundle_hashes) == 16
    assert bundle_hashes.isdisjoint(real_hashes)
    assert bundle_hashes == set(load_dataset(syn).metadata["sha256"])


def test_a_copied_real_image_is_caught(tmp_path, pneumonia_slice):
    real = load_dataset(pneumonia_slice)
    train_images, train_meta = real.split("train")
    images = np.random.default_rng(3).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    images[4] = train_images[0]  # a memorised training image
    syn = make_synthetic(tmp_path / "syn", images=images)
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    # The pixel-hash check used above would see it ...
    root = tmp_path / "unguarded"
    root.mkdir()
    write_bundle_content(root, synthetic_dir=syn, public_report_dir=None, facts=facts)
    assert train_meta["sha256"].iloc[0] in _bundle_png_hashes(root)
    # ... and with the real hashes given, the writer refuses.
    guarded = tmp_path / "guarded"
    guarded.mkdir()
    with pytest.raises(PolicyBlocked, match="exact copies of real images"):
        write_bundle_content(
            guarded, synthetic_dir=syn, public_report_dir=None, facts=facts,
            real_pixel_hashes=set(real.metadata["sha256"]),
        )


def test_a_real_dataset_is_refused(tmp_path, pneumonia_slice):
    syn = make_synthetic(tmp_path / "syn")
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    root = tmp_path / "b"
    root.mkdir()
    with pytest.raises(InputError, match="only a generated set"):
        write_bundle_content(root, synthetic_dir=pneumonia_slice, public_report_dir=None, facts=facts)
    assert list(root.iterdir()) == []


def test_facts_must_name_the_synthetic_set(tmp_path):
    syn = make_synthetic(tmp_path / "syn")
    other = make_synthetic(tmp_path / "other", seed=9)
    facts = demo_facts(SyntheticFacts.from_dataset(other))
    root = tmp_path / "b"
    root.mkdir()
    with pytest.raises(IntegrityError, match="not the synthetic set the release facts name"):
        write_bundle_content(root, synthetic_dir=syn, public_report_dir=None, facts=facts)


def test_every_class_needs_an_image(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8) + np.arange(3, dtype=np.uint8)[:, None, None]
    syn = make_synthetic(tmp_path / "syn", images=images, class_names=("a", "b", "c", "d"))
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    root = tmp_path / "b"
    root.mkdir()
    with pytest.raises(InputError, match=r"no synthetic image of class\(es\) \['d'\]"):
        write_bundle_content(root, synthetic_dir=syn, public_report_dir=None, facts=facts)


def test_refuses_a_used_directory(tmp_path):
    syn = make_synthetic(tmp_path / "syn")
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    root = tmp_path / "b"
    root.mkdir()
    (root / "README.md").write_text("old")
    with pytest.raises(InputError, match="fresh directory"):
        write_bundle_content(root, synthetic_dir=syn, public_report_dir=None, facts=facts)
    with pytest.raises(InputError, match="does not exist"):
        write_bundle_content(tmp_path / "nope", synthetic_dir=syn, public_report_dir=None, facts=facts)


# --- report ---------------------------------------------------------------------------------------------


def _public_report(where: Path, figure: np.ndarray | None = None) -> Path:
    report = where / "public-report"
    (report / "figures").mkdir(parents=True)
    (report / "index.html").write_text("<html><body>report</body></html>")
    (report / "figures" / "grid.png").write_bytes(
        png_bytes(figure if figure is not None else np.full((40, 60), 128, np.uint8))
    )
    return report


def test_report_and_summaries_are_copied(tmp_path):
    syn = make_synthetic(tmp_path / "syn")
    facts = demo_facts(SyntheticFacts.from_dataset(syn))
    report = _public_report(tmp_path)
    summary_file = tmp_path / "utility.json"
    summary_file.write_text('{"tstr": 0.88}\n')
    root = tmp_path / "b"
    root.mkdir()
    written = write_bundle_content(
        root, synthetic_dir=syn, public_report_dir=report, facts=facts,
        summaries={"privacy.json": {"flagged": 0}, "utility.json": summary_file},
    )
    assert {"report/index.html", "report/figures/grid.png", "report/privacy.json", "report/utility.json"} <= set(
        written
    )
    assert (root / "report/utility.json").read_text() == '{"tstr": 0.88}\n'
    assert (root / "report/figures/grid.png").read_bytes() == (report / "figures/grid.png").read_bytes()
    assert written == _files(root)


def test_report_rejects_links_bad_names_and_real_figures(tmp_path, pneumonia_slice):
    syn = make_synthetic(tmp_path / "syn")
    facts = demo_facts(SyntheticFacts.from_dataset(syn))

    def attempt(name: str, report: Path | None, **kw):
        root = tmp_path / name
        root.mkdir()
        return write_bundle_content(root, synthetic_dir=syn, public_report_dir=report, facts=facts, **kw)

    linked = _public_report(tmp_path / "l")
    (linked / "secret").symlink_to(pneumonia_slice / "dataset.json")
    with pytest.raises(InputError, match="symbolic link"):
        attempt("b1", linked)
    with pytest.raises(InputError, match="plain file name"):
        attempt("b2", None, summaries={"../escape.json": {}})
    real = load_dataset(pneumonia_slice)
    leaky = _public_report(tmp_path / "r", figure=np.asarray(real.images[0]))
    with pytest.raises(PolicyBlocked, match="copy of a real image"):
        attempt("b3", leaky, real_pixel_hashes=set(real.metadata["sha256"]))
    shutil.rmtree(tmp_path / "b3")
    assert attempt("b3", leaky)  # without the real hashes the report is copied as given


def test_card_names_publisher_and_contact_and_its_plain_loader_works(bundle):
    """The card's table names the publisher and contact (the fixture's facts set both), and its no-library loading
    snippet (csv + Pillow), run as printed, gives metadata.csv's labels."""
    import re

    root, _ = bundle
    card = (root / "README.md").read_text()
    assert "| Publisher | Demo Hospital Data Office |" in card and "| Contact | data-office@example.org |" in card
    assert "from torchvision" not in card and "**not** tested" in card
    snippet = re.search(r"```python\n(import csv\n.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(snippet.replace("path/to/BUNDLE", str(root)), scope)
    table = _csv(root)
    assert scope["labels"] == table["label"].tolist() and len(scope["images"]) == len(table)
    assert scope["images"][0].size == (28, 28)
