from __future__ import annotations

import json
import shutil

import pytest

from flows.keys import generate_keys, load_public_key
from flows.publish import check_release_id, publish, published, write_index
from flows.signing import sign_bundle
from synth.errors import InputError, IntegrityError


@pytest.fixture
def signed(tmp_path):
    private, public = generate_keys(tmp_path / "keys")

    def make(name, summary="<b>pneumonia</b> synthetic", release_id="r-1"):
        bundle = tmp_path / "work" / name
        bundle.mkdir(parents=True)
        (bundle / "README.md").write_text("card")
        sign_bundle(bundle, private, predicate={
            "release_id": release_id, "summary": summary, "privacy": {"epsilon": 8.0, "delta": 1e-5},
            "synthetic": {"images": 10}})
        return bundle

    return make, load_public_key(public)


def test_publish_lists_release_and_escapes_html(tmp_path, signed):
    make, public = signed
    releases = tmp_path / "releases"
    target = publish(make("a"), releases, public, release_id="r-1")
    assert (target / "README.md").exists()
    index = json.loads((releases / "index.json").read_text())
    assert [r["release_id"] for r in index["releases"]] == ["r-1"] and index["releases"][0]["epsilon"] == 8.0
    html = (releases / "index.html").read_text()
    assert "&lt;b&gt;pneumonia" in html and "<b>pneumonia" not in html and "synthgate verify" in html


def test_tampered_release_is_hidden_from_the_index(tmp_path, signed):
    make, public = signed
    releases = tmp_path / "releases"
    publish(make("a"), releases, public, release_id="r-1")
    publish(make("b", release_id="r-2"), releases, public, release_id="r-2")
    (releases / "r-1" / "README.md").write_text("tampered")
    entries = write_index(releases, public)
    assert [e.release_id for e in entries] == ["r-2"]
    assert json.loads((releases / "index.json").read_text())["hidden_failed_verification"] == ["r-1"]


def test_publish_refuses_unsigned_duplicate_and_bad_ids(tmp_path, signed):
    make, public = signed
    releases = tmp_path / "releases"
    bundle = make("a")
    (bundle / "extra.txt").write_text("x")
    with pytest.raises(IntegrityError):
        publish(bundle, releases, public, release_id="r-1")
    assert not (releases / "r-1").exists()
    publish(make("b"), releases, public, release_id="r-1")
    with pytest.raises(InputError, match="already published"):
        publish(make("c", summary="another release"), releases, public, release_id="r-1")
    for bad in ["../x", "A", "", ".hidden", "a/b"]:
        with pytest.raises(InputError):
            check_release_id(bad)


def test_publish_and_index_bind_the_signed_release_id(tmp_path, signed):
    make, public = signed
    releases = tmp_path / "releases"
    with pytest.raises(IntegrityError, match="signed as release 'r-1', not 'r-2'"):
        publish(make("a"), releases, public, release_id="r-2")
    assert not (releases / "r-2").exists()
    publish(make("b"), releases, public, release_id="r-1")
    # a genuine release copied under another folder name is not listed under that name
    shutil.copytree(releases / "r-1", releases / "r-9")
    entries = write_index(releases, public)
    assert [e.release_id for e in entries] == ["r-1"]
    assert json.loads((releases / "index.json").read_text())["hidden_failed_verification"] == ["r-9"]


def test_rerun_after_a_crash_before_the_index_repairs_it(tmp_path, signed, monkeypatch):
    make, public = signed
    releases = tmp_path / "releases"
    bundle = make("a")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the move and the index")

    monkeypatch.setattr("flows.publish.write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        publish(bundle, releases, public, release_id="r-1")
    monkeypatch.undo()
    assert (releases / "r-1").is_dir() and not (releases / "index.json").exists()
    # the same bundle again: no "already published", the index now lists it
    assert publish(bundle, releases, public, release_id="r-1") == releases / "r-1"
    assert [r["release_id"] for r in json.loads((releases / "index.json").read_text())["releases"]] == ["r-1"]
    # the flow's rerun builds a new bundle (new timestamps): it finds the published release instead
    (releases / "index.json").unlink()
    assert published(releases, public, "r-1") == releases / "r-1"
    assert [r["release_id"] for r in json.loads((releases / "index.json").read_text())["releases"]] == ["r-1"]
    assert published(releases, public, "r-2") is None


def test_overlong_release_id_is_an_input_error():
    with pytest.raises(InputError, match="at most 100 characters"):
        check_release_id("a" * 5000)
    assert check_release_id("a" * 100) == "a" * 100


def test_a_malformed_neighbour_does_not_break_publishing(tmp_path, signed):
    make, public = signed
    releases = tmp_path / "releases"
    publish(make("a"), releases, public, release_id="r-1")
    (releases / "r-1" / "release.sig").write_text("[" * 100_000 + "]" * 100_000)
    publish(make("b", release_id="r-2"), releases, public, release_id="r-2")
    index = json.loads((releases / "index.json").read_text())
    assert [r["release_id"] for r in index["releases"]] == ["r-2"] and index["hidden_failed_verification"] == ["r-1"]
