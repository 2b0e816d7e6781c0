"""Keys, signing and verification: any tampering with a signed bundle is caught."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat

import pytest

from flows.cli import run
from flows.keys import generate_keys, load_private_key, load_public_key
from flows.signing import MANIFEST, PROVENANCE, SIGNATURE, _payload, sign_bundle, verify_bundle
from synth.artifacts import sha256_file, write_json
from synth.errors import InputError, IntegrityError


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keys(tmp_path_factory.mktemp("k") / "keys")


def _bundle(root, keys, name="b"):
    bundle = root / name
    (bundle / "data" / "0_normal").mkdir(parents=True)
    (bundle / "data" / "0_normal" / "a.png").write_bytes(b"\x89PNG fake a")
    (bundle / "data" / "metadata.csv").write_text("file_name,label\n0_normal/a.png,0\n")
    (bundle / "README.md").write_text("# card\n")
    sign_bundle(bundle, load_private_key(keys[0]), predicate={"epsilon": 8.0, "release_id": "r1"})
    return bundle


def test_private_key_mode_and_round_trip(tmp_path, keys):
    private, public = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PRIVATE" not in public.read_bytes()
    bundle = _bundle(tmp_path, keys)
    result = verify_bundle(bundle, load_public_key(public))
    assert result.files == 3 and result.predicate["epsilon"] == 8.0
    assert {s["name"] for s in json.loads((bundle / PROVENANCE).read_text())["subject"]} == {
        "README.md", "data/metadata.csv", "data/0_normal/a.png"}


def test_passphrase_protected_key(tmp_path):
    private, _ = generate_keys(tmp_path / "k", passphrase=b"s3cret")
    assert b"ENCRYPTED" in private.read_bytes()
    load_private_key(private, passphrase=b"s3cret")
    with pytest.raises(InputError, match="passphrase"):
        load_private_key(private)
    with pytest.raises(InputError, match="passphrase is wrong"):
        load_private_key(private, passphrase=b"nope")


def _flip_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_signature_byte(bundle):
    sig = json.loads((bundle / SIGNATURE).read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[10] ^= 0x01
    sig["signature"] = base64.b64encode(bytes(raw)).decode()
    (bundle / SIGNATURE).write_text(json.dumps(sig))


def _edit(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


TAMPERS = {
    "png byte": lambda b: _flip_byte(b / "data" / "0_normal" / "a.png", 5),
    "last byte of csv": lambda b: _flip_byte(b / "data" / "metadata.csv", -1),
    "card byte": lambda b: _flip_byte(b / "README.md"),
    "file added": lambda b: (b / "data" / "extra.png").write_bytes(b"x"),
    "file removed": lambda b: (b / "README.md").unlink(),
    "manifest edited": lambda b: _edit(b / MANIFEST, '"size": 1', '"size": 2'),
    "provenance edited": lambda b: _edit(b / PROVENANCE, "8.0", "1.0"),
    "signature byte": _flip_signature_byte,
    "signature removed": lambda b: (b / SIGNATURE).unlink(),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_bundle_fails(tmp_path, keys, tamper):
    bundle = _bundle(tmp_path, keys)
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    TAMPERS[tamper](bundle)
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} != before
    with pytest.raises(IntegrityError):
        verify_bundle(bundle, load_public_key(keys[1]))


def test_swapped_manifest_and_signature_from_another_bundle_fail(tmp_path, keys):
    a = _bundle(tmp_path, keys, "a")
    b = _bundle(tmp_path, keys, "b")
    (b / "README.md").write_text("# another card\n")
    sign_bundle(b, load_private_key(keys[0]), predicate={"epsilon": 1.0})
    for name in (MANIFEST, SIGNATURE):
        target = tmp_path / f"swap-{name}"
        shutil.copytree(a, target)
        (target / name).write_bytes((b / name).read_bytes())
        with pytest.raises(IntegrityError):
            verify_bundle(target, load_public_key(keys[1]))


def test_wrong_key_fails(tmp_path, keys):
    bundle = _bundle(tmp_path, keys)
    _, other_pub = generate_keys(tmp_path / "other")
    with pytest.raises(IntegrityError, match="not valid for the given key"):
        verify_bundle(bundle, load_public_key(other_pub))


def test_manifest_path_escape_is_refused(tmp_path, keys):
    bundle = _bundle(tmp_path, keys)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][0]["path"] = "../outside.txt"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    # Re-sign so only the path rule can catch it.
    signed = {MANIFEST: sha256_file(bundle / MANIFEST), PROVENANCE: sha256_file(bundle / PROVENANCE)}
    sig = json.loads((bundle / SIGNATURE).read_text())
    sig["signed"] = signed
    sig["signature"] = base64.b64encode(load_private_key(keys[0]).sign(_payload(signed))).decode()
    write_json(bundle / SIGNATURE, sig)
    with pytest.raises(IntegrityError, match="escapes the bundle"):
        verify_bundle(bundle, load_public_key(keys[1]))


def test_cli_keys_and_verify(tmp_path, capsys):
    assert run(["keys", "generate", "--out", str(tmp_path / "keys")]) == 0
    keys = (tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub")
    bundle = _bundle(tmp_path, keys)
    assert run(["verify", str(bundle), "--key", str(keys[1])]) == 0
    assert "valid" in capsys.readouterr().out
    (bundle / "README.md").write_text("changed")
    assert run(["verify", str(bundle), "--key", str(keys[1])]) == 1
    err = capsys.readouterr().err
    assert "README.md" in err and "Traceback" not in err
    assert run(["keys", "generate", "--out", str(tmp_path / "keys")]) == 2  # never overwrite a key


def _rewrite_signature(bundle, change):
    """Apply `change` to the parsed signature file and write it back canonically (as sign_bundle does)."""
    sig = json.loads((bundle / SIGNATURE).read_text())
    change(sig)
    write_json(bundle / SIGNATURE, sig)


MALFORMED_SIGNATURES = {
    "deeply nested": lambda b: (b / SIGNATURE).write_text("[" * 100_000 + "]" * 100_000),
    "5000-digit number": lambda b: (b / SIGNATURE).write_text("1" * 5000),
    "nested in a field": lambda b: (b / SIGNATURE).write_text(
        '{"algorithm": ' + "[" * 1500 + "]" * 1500 + "}"),
    "huge number in a field": lambda b: _rewrite_signature(b, lambda s: s.update(algorithm=10 ** 4000)),
    "a list": lambda b: (b / SIGNATURE).write_text("[]"),
    "not utf-8": lambda b: (b / SIGNATURE).write_bytes(b"\xff\xfe{}"),
    "signed is a list": lambda b: _rewrite_signature(b, lambda s: s.update(signed=[["a", "b"]])),
    "signed has an extra key": lambda b: _rewrite_signature(b, lambda s: s["signed"].update(x="0" * 64)),
    "digest not hex": lambda b: _rewrite_signature(b, lambda s: s["signed"].update({MANIFEST: "z" * 64})),
    "signature not a string": lambda b: _rewrite_signature(b, lambda s: s.update(signature={"a": 1})),
    "signature not base64": lambda b: _rewrite_signature(b, lambda s: s.update(signature="!!")),
    "extra key": lambda b: _rewrite_signature(b, lambda s: s.update(note="x")),
    "missing key": lambda b: _rewrite_signature(b, lambda s: s.pop("algorithm")),
    "fingerprint changed": lambda b: _rewrite_signature(b, lambda s: s.update(public_key_fingerprint="0" * 64)),
    "reformatted": lambda b: (b / SIGNATURE).write_text(json.dumps(json.loads((b / SIGNATURE).read_text()))),
    "larger than the limit": lambda b: (b / SIGNATURE).write_text(" " * 10_000),
    "a directory": lambda b: ((b / SIGNATURE).unlink(), (b / SIGNATURE).mkdir()),
}


@pytest.mark.parametrize("case", list(MALFORMED_SIGNATURES))
def test_malformed_signature_file_is_an_integrity_failure(tmp_path, keys, case, capsys):
    bundle = _bundle(tmp_path, keys)
    MALFORMED_SIGNATURES[case](bundle)
    with pytest.raises(IntegrityError, match="signature"):
        verify_bundle(bundle, load_public_key(keys[1]))
    assert run(["verify", str(bundle), "--key", str(keys[1])]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_signed_manifest_and_provenance_are_integrity_failures(tmp_path, keys):
    private = load_private_key(keys[0])
    cases = {
        MANIFEST: ['{"files": [1]}', '{"files": [{"path": "README.md", "sha256": 5, "size": 1}]}',
                   '{"files": [{"path": "README.md", "sha256": "' + "0" * 64 + '", "size": true}]}',
                   '{"files": [{"path": "a\\u0000b", "sha256": "' + "0" * 64 + '", "size": 1}]}',
                   "[" * 5000 + "]" * 5000, "9" * 5000],
        PROVENANCE: ['{"_type": "https://in-toto.io/Statement/v1", "subject": [1, "x"]}', "[]",
                     "[" * 5000 + "]" * 5000],
    }
    for name, texts in cases.items():
        for i, text in enumerate(texts):
            bundle = _bundle(tmp_path, keys, f"{name}-{i}")
            (bundle / name).write_text(text)
            # Re-sign so only the structural checks can catch it.
            signed = {MANIFEST: sha256_file(bundle / MANIFEST), PROVENANCE: sha256_file(bundle / PROVENANCE)}
            _rewrite_signature(bundle, lambda s, signed=signed: s.update(
                signed=signed, signature=base64.b64encode(private.sign(_payload(signed))).decode()))
            with pytest.raises(IntegrityError):
                verify_bundle(bundle, load_public_key(keys[1]))


def test_signed_release_id_must_be_the_one_asked_for(tmp_path, keys, capsys):
    bundle = _bundle(tmp_path, keys)  # signed as release "r1"
    public = load_public_key(keys[1])
    assert verify_bundle(bundle, public, release_id="r1").release_id == "r1"
    with pytest.raises(IntegrityError, match="signed as release 'r1', not 'r0'"):
        verify_bundle(bundle, public, release_id="r0")
    assert run(["verify", str(bundle), "--key", str(keys[1]), "--release-id", "r0"]) == 1
    assert "signed as release" in capsys.readouterr().err


def test_empty_directories_and_special_files_are_refused(tmp_path, keys):
    bundle = _bundle(tmp_path, keys, "empty")
    (bundle / "data" / "nothing").mkdir()
    with pytest.raises(IntegrityError, match="empty directory"):
        verify_bundle(bundle, load_public_key(keys[1]))
    with pytest.raises(IntegrityError, match="empty directory"):
        sign_bundle(bundle, load_private_key(keys[0]), predicate={})
    bundle = _bundle(tmp_path, keys, "fifo")
    os.unlink(bundle / "README.md")
    os.mkfifo(bundle / "README.md")  # hashing a FIFO would block forever
    with pytest.raises(IntegrityError, match="not a regular file"):
        verify_bundle(bundle, load_public_key(keys[1]))
