from __future__ import annotations

import json

import pytest

from flows.keys import generate_keys, load_private_key, load_public_key
from flows.publish import check_release_id, publish, write_index
from flows.signing import sign_bundle
from synth.errors import InputError, IntegrityError


@pytest.fixture
def signed(tmp_path):
    private, public = generate_keys(tmp_path / "keys")

    def make(name, summary="<b>pneumonia</b> synthetic"):
        bundle = tmp_path / "work" / name
        bundle.mkdir(parents=True)
        (bundle / "README.md").write_text("card")
        sign_bundle(bundle, load_private_key(private), predicate={
            "summary": summary, "privacy": {"epsilon": 8.0, "delta": 1e-5}, "synthetic": {"images": 10}})
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
    publish(make("b"), releases, public, release_id="r-2")
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
        publish(make("c"), releases, public, release_id="r-1")
    for bad in ["../x", "A", "", ".hidden", "a/b"]:
        with pytest.raises(InputError):
            check_release_id(bad)
