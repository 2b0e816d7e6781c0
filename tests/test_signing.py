"""Keys, signing and verification: any tampering with a signed bundle is caught."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from flows.cli import run
from flows.keys import generate_keys, load_private_key, load_public_key
from flows.model_signature import sign_directory
from flows.signing import MANIFEST, PROVENANCE, SIGNATURE, sign_bundle, verify_bundle
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
    sign_bundle(bundle, keys[0], predicate={"epsilon": 8.0, "release_id": "r1"})
    return bundle


def test_private_key_mode_and_round_trip(tmp_path, keys):
    private, public = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PRIVATE" not in public.read_bytes()
    assert isinstance(load_private_key(private), ec.EllipticCurvePrivateKey)
    assert load_public_key(public).curve.name == "secp256r1"  # the curve OpenSSF Model Signing names first
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
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "README.md").write_text("card")
    sign_bundle(bundle, private, predicate={}, passphrase=b"s3cret")
    assert verify_bundle(bundle, load_public_key(tmp_path / "k" / "release.pub")).files == 1


def _flip_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_signature_byte(bundle):
    sig = json.loads((bundle / SIGNATURE).read_text())
    envelope = sig["dsseEnvelope"]["signatures"][0]
    raw = bytearray(base64.b64decode(envelope["sig"]))
    raw[10] ^= 0x01
    envelope["sig"] = base64.b64encode(bytes(raw)).decode()
    (bundle / SIGNATURE).write_text(json.dumps(sig, separators=(",", ":")))


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
    sign_bundle(b, keys[0], predicate={"epsilon": 1.0})
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
    sign_directory(bundle, keys[0])  # re-sign so only the path rule can catch it
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
    """Apply `change` to the parsed release.sig and write it back (the signature itself is left as it was)."""
    sig = json.loads((bundle / SIGNATURE).read_text())
    change(sig)
    (bundle / SIGNATURE).write_text(_compact(sig))


def _compact(sig):
    return json.dumps(sig, separators=(",", ":"))  # as model_signing writes it


def _envelope(change):
    return lambda s: change(s["dsseEnvelope"])


MALFORMED_SIGNATURES = {
    "deeply nested": lambda b: (b / SIGNATURE).write_text("[" * 100_000 + "]" * 100_000),
    "5000-digit number": lambda b: (b / SIGNATURE).write_text("1" * 5000),
    "nested in a field": lambda b: (b / SIGNATURE).write_text('{"mediaType": ' + "[" * 1500 + "]" * 1500 + "}"),
    "huge number in a field": lambda b: _rewrite_signature(b, lambda s: s.update(mediaType=10 ** 4000)),
    "a list": lambda b: (b / SIGNATURE).write_text("[]"),
    "not utf-8": lambda b: (b / SIGNATURE).write_bytes(b"\xff\xfe{}"),
    "other media type": lambda b: _rewrite_signature(b, lambda s: s.update(mediaType="x")),
    "no verification material": lambda b: _rewrite_signature(b, lambda s: s.pop("verificationMaterial")),
    "key hint changed": lambda b: _rewrite_signature(
        b, lambda s: s["verificationMaterial"]["publicKey"].update(hint="0" * 64)),
    "envelope a list": lambda b: _rewrite_signature(b, lambda s: s.update(dsseEnvelope=[])),
    "other payload type": lambda b: _rewrite_signature(b, _envelope(lambda e: e.update(payloadType="text/plain"))),
    "two signatures": lambda b: _rewrite_signature(b, _envelope(lambda e: e["signatures"].append(e["signatures"][0]))),
    "signature not a string": lambda b: _rewrite_signature(b, _envelope(lambda e: e["signatures"][0].update(sig=[1]))),
    "signature not base64": lambda b: _rewrite_signature(b, _envelope(lambda e: e["signatures"][0].update(sig="!!"))),
    "payload not base64": lambda b: _rewrite_signature(b, _envelope(lambda e: e.update(payload="!!"))),
    "payload replaced": lambda b: _rewrite_signature(b, _envelope(lambda e: e.update(
        payload=base64.b64encode(b'{"_type": "x"}').decode()))),
    "a directory": lambda b: ((b / SIGNATURE).unlink(), (b / SIGNATURE).mkdir()),
    "reformatted": lambda b: (b / SIGNATURE).write_text(json.dumps(json.loads((b / SIGNATURE).read_text()))),
    "unsigned field added": lambda b: _rewrite_signature(b, lambda s: s.update(note="trust me")),
    "keyid set": lambda b: _rewrite_signature(b, _envelope(lambda e: e["signatures"][0].update(keyid="k"))),
}


@pytest.mark.parametrize("case", list(MALFORMED_SIGNATURES))
def test_malformed_signature_file_is_an_integrity_failure(tmp_path, keys, case, capsys):
    bundle = _bundle(tmp_path, keys)
    MALFORMED_SIGNATURES[case](bundle)
    with pytest.raises(IntegrityError, match=r"release\.sig"):
        verify_bundle(bundle, load_public_key(keys[1]))
    assert run(["verify", str(bundle), "--key", str(keys[1])]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_signature_larger_than_the_limit_is_refused(tmp_path, keys, monkeypatch):
    bundle = _bundle(tmp_path, keys)
    monkeypatch.setattr("flows.signing.MAX_SIGNATURE_BYTES", 1000)  # a genuine one here is ~2 kB
    with pytest.raises(IntegrityError, match="larger than 1,000 bytes"):
        verify_bundle(bundle, load_public_key(keys[1]))


def _sign_statement(bundle, private_path, change):
    """Re-sign release.sig over its own statement after `change`: a validly signed, structurally odd signature."""
    from flows.model_signature import PAYLOAD_TYPE, pae

    sig = json.loads((bundle / SIGNATURE).read_text())
    statement = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    change(statement)
    payload = json.dumps(statement).encode()
    raw = load_private_key(private_path).sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    sig["dsseEnvelope"].update(payload=base64.b64encode(payload).decode(),
                               signatures=[{"sig": base64.b64encode(raw).decode(), "keyid": ""}])
    (bundle / SIGNATURE).write_text(_compact(sig))


def _resource(statement, name):
    return next(r for r in statement["predicate"]["resources"] if r["name"] == name)


def _drop(s, name):
    """Leave `name` out of the signed resources, keeping the subject digest consistent with them."""
    import hashlib

    s["predicate"]["resources"] = [r for r in s["predicate"]["resources"] if r["name"] != name]
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in s["predicate"]["resources"]))
    s["subject"][0]["digest"]["sha256"] = root.hexdigest()


ODD_STATEMENTS = {  # change, the message that must name the problem
    "other predicate type": (lambda s: s.update(predicateType="https://model_signing/Digests/v0.1"),
                             "does not sign an OpenSSF Model Signing v1.0 statement"),
    # a signer that ignored more paths would leave files unsigned
    "more ignored paths": (lambda s: s["predicate"]["serialization"].update(ignore_paths=["release.sig", "data"]),
                           "other settings"),
    "subject digest": (lambda s: s["subject"][0]["digest"].update(sha256="0" * 64), "subject digest"),
    "path escape": (lambda s: _resource(s, "README.md").update(name="../README.md"), "malformed or repeated"),
    "other algorithm": (lambda s: _resource(s, "README.md").update(algorithm="blake2"), "malformed or repeated"),
    "resources not a list": (lambda s: s["predicate"].update(resources={"a": 1}), "no resource list"),
    "manifest left out": (lambda s: _drop(s, MANIFEST), "does not sign manifest.json"),
}


@pytest.mark.parametrize("case", list(ODD_STATEMENTS))
def test_validly_signed_odd_statements_are_refused(tmp_path, keys, case):
    bundle = _bundle(tmp_path, keys)
    change, message = ODD_STATEMENTS[case]
    _sign_statement(bundle, keys[0], change)
    with pytest.raises(IntegrityError, match=message):
        verify_bundle(bundle, load_public_key(keys[1]))


def test_malformed_signed_manifest_and_provenance_are_integrity_failures(tmp_path, keys):
    cases = {
        MANIFEST: ['{"schema_version": 2, "files": [1]}',
                   '{"schema_version": 2, "files": [{"path": "README.md", "sha256": 5, "size": 1}]}',
                   '{"schema_version": 2, "files": [{"path": "README.md", "sha256": "' + "0" * 64
                   + '", "size": true}]}',
                   '{"schema_version": 2, "files": [{"path": "a\\u0000b", "sha256": "' + "0" * 64 + '", "size": 1}]}',
                   '{"schema_version": 1, "files": []}', "[" * 5000 + "]" * 5000, "9" * 5000],
        PROVENANCE: ['{"_type": "https://in-toto.io/Statement/v1", "subject": [1, "x"]}', "[]",
                     "[" * 5000 + "]" * 5000],
    }
    for name, texts in cases.items():
        for i, text in enumerate(texts):
            bundle = _bundle(tmp_path, keys, f"{name}-{i}")
            (bundle / name).write_text(text)
            sign_directory(bundle, keys[0])  # re-sign so only the structural checks can catch it
            with pytest.raises(IntegrityError):
                verify_bundle(bundle, load_public_key(keys[1]))


def test_manifest_must_list_what_release_sig_signs(tmp_path, keys):
    bundle = _bundle(tmp_path, keys)
    (bundle / "NOTES.md").write_text("added after the manifest was written")
    sign_directory(bundle, keys[0])  # release.sig covers NOTES.md, the manifest does not
    with pytest.raises(IntegrityError, match="signs other files than the manifest lists"):
        verify_bundle(bundle, load_public_key(keys[1]))


def test_bundle_in_the_old_format_gets_one_line(tmp_path, keys, capsys):
    bundle = _bundle(tmp_path, keys)
    (bundle / SIGNATURE).unlink()
    (bundle / "signature").write_text('{"algorithm": "ed25519"}\n')  # what synthgate 0.1 wrote
    with pytest.raises(IntegrityError, match="bundle format 1"):
        verify_bundle(bundle, load_public_key(keys[1]))
    assert run(["verify", str(bundle), "--key", str(keys[1])]) == 1
    err = capsys.readouterr().err.strip()
    assert "bundle format 1" in err and "re-sign" in err and len(err.splitlines()) == 1


def _ed25519_keys(root):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root.mkdir()
    key = Ed25519PrivateKey.generate()
    (root / "release.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (root / "release.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return root / "release.key", root / "release.pub"


def test_old_ed25519_keys_get_one_line_saying_how_to_regenerate(tmp_path, keys, capsys, monkeypatch):
    old_private, old_public = _ed25519_keys(tmp_path / "old")
    with pytest.raises(InputError, match=r"Ed25519 key.*synthgate keys generate"):
        load_private_key(old_private)
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "README.md").write_text("card")
    with pytest.raises(InputError, match="Ed25519"):
        sign_bundle(bundle, old_private, predicate={})
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md"]  # nothing half-written
    signed = _bundle(tmp_path, keys)
    assert run(["verify", str(signed), "--key", str(old_public)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Ed25519" in err and "release.pub" in err and len(err.splitlines()) == 1
    # signing happens in `synthgate release`: its preflight refuses the old key before any stage runs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.npz").write_bytes(b"")
    (tmp_path / "release.yaml").write_text(
        "workdir: work\nreleases_dir: releases\nprivate_key: old/release.key\nsource: {path: ok.npz}\n")
    monkeypatch.setattr("flows.release.release", lambda *a, **k: pytest.fail("a stage ran"))
    assert run(["release", "--config", "release.yaml", "--auto-approve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Ed25519" in err and "synthgate keys generate" in err and len(err.splitlines()) == 1


def test_model_signing_cli_verifies_a_fresh_bundle_and_refuses_a_tampered_one(tmp_path, keys):
    """The standard check, by the reference tool, exactly as the README documents it."""
    bundle = _bundle(tmp_path, keys)

    def model_signing_verify():
        return subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(bundle),
                               "--signature", str(bundle / SIGNATURE), "--public_key", str(keys[1])],
                              capture_output=True, text=True, timeout=120)

    ok = model_signing_verify()
    assert ok.returncode == 0 and "Verification succeeded" in ok.stdout, ok.stderr
    _flip_byte(bundle / "data" / "0_normal" / "a.png", 5)
    bad = model_signing_verify()
    assert bad.returncode != 0 and "data/0_normal/a.png" in bad.stderr


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
        sign_bundle(bundle, keys[0], predicate={})
    bundle = _bundle(tmp_path, keys, "fifo")
    os.unlink(bundle / "README.md")
    os.mkfifo(bundle / "README.md")  # hashing a FIFO would block forever
    with pytest.raises(IntegrityError, match="not a regular file"):
        verify_bundle(bundle, load_public_key(keys[1]))
