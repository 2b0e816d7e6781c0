"""The bundle's standard signature: OpenSSF Model Signing v1.0 (`release.sig`), made and checked with `model_signing`.

`release.sig` is a Sigstore bundle (JSON) holding a DSSE envelope whose payload is an in-toto Statement v1 with
predicate type `https://model_signing/signature/v1.0`: the sha256 of every file of the bundle directory except
`release.sig` itself (recorded in the signature as an ignored path), signed with the steward's ECDSA key. Anyone
can check it without synthgate:

    model_signing verify key BUNDLE --signature BUNDLE/release.sig --public_key release.pub

Signing uses `model_signing`'s public API. Verification happens twice in `synthgate verify`:
`signed_digests` checks the envelope from bytes read once under a size limit (so the digests the rest of
`flows.signing` trusts are the very bytes that were verified, and malformed input is one IntegrityError line),
then `reference_verify` runs `model_signing`'s own verifier over the directory, as the command above does.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from flows.keys import PublicKey, fingerprint
from synth.errors import IntegrityError, where

SIGNATURE = "release.sig"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# What synthgate signs with; anything else in a bundle's release.sig was not made by this version.
SERIALIZATION = {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": [SIGNATURE]}
_CURVE_HASH = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}
_HEX = set("0123456789abcdef")


def _hashing_config() -> Any:
    import model_signing

    # Paths are relative to the bundle; git paths are not special in a bundle, so they are signed like any file.
    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def sign_directory(root: Path, private_key_path: Path, *, passphrase: bytes | None = None) -> None:
    """Write `root/release.sig`: model_signing's elliptic-key signature over every other file of `root`."""
    import model_signing

    root = Path(root)
    # model_signing passes the password straight to cryptography, which takes bytes.
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key_path,
                                                                    password=passphrase)  # type: ignore[arg-type]
    config.set_hashing_config(_hashing_config()).sign(root, root / SIGNATURE)


def reference_verify(root: Path, public_key_path: Path) -> str:
    """Verify `root/release.sig` with model_signing's own verifier (as its CLI does); return its version.

    Raises IntegrityError with model_signing's reason on the first line."""
    import model_signing

    root = Path(root)
    config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key_path)
    try:
        config.set_hashing_config(_hashing_config()).verify(root, root / SIGNATURE)
    except Exception as e:  # model_signing raises ValueError, KeyError, OSError… depending on what is wrong
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IntegrityError(where(root / SIGNATURE, f"model_signing verification failed: {first[:300]}")) from None
    return model_signing.__version__


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the envelope's signature is over."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def signed_digests(path: Path, data: bytes, public_key: PublicKey) -> dict[str, str]:
    """Verify the release.sig bytes `data` under `public_key`; return {relative path: sha256} of what it signs.

    Raises IntegrityError (naming `path`) for anything malformed, another key, a bad signature, or a signature
    made with other settings than synthgate's (e.g. files left unsigned)."""
    doc = _obj(path, _parse(path, data), "the signature")
    if doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        media = short_repr(doc.get("mediaType"))
        raise IntegrityError(where(path, f"is not a Sigstore bundle v0.3 (mediaType {media})"))
    hint = _obj(path, _obj(path, doc.get("verificationMaterial"), "verificationMaterial").get("publicKey"),
                "verificationMaterial.publicKey").get("hint")
    fp = fingerprint(public_key)
    if hint != fp:
        raise IntegrityError(where(path, f"signature is not valid for the given key (signed by key {short_repr(hint)}, "
                                         f"given key {fp[:16]}…)"))
    envelope = _obj(path, doc.get("dsseEnvelope"), "dsseEnvelope")
    sigs = envelope.get("signatures")
    if envelope.get("payloadType") != PAYLOAD_TYPE or not isinstance(sigs, list) or len(sigs) != 1:
        raise IntegrityError(where(path, "is malformed (need one signature over an in-toto payload)"))
    payload = _b64(path, envelope.get("payload"), "payload")
    signature = _b64(path, _obj(path, sigs[0], "signatures[0]").get("sig"), "signature")
    # release.sig is not signed itself: every byte must be exactly what model_signing writes for these fields, so
    # no byte of the bundle can change unnoticed and nothing unsigned rides along.
    if data != _canonical(hint, envelope["payload"], sigs[0]["sig"]):
        raise IntegrityError(where(path, "is not in the exact form model_signing writes (fields added, removed, "
                                         "reordered or re-encoded)"))
    try:
        public_key.verify(signature, pae(PAYLOAD_TYPE, payload), ec.ECDSA(_CURVE_HASH[public_key.curve.key_size]()))
    except InvalidSignature:
        problem = f"signature is not valid for the given key (fingerprint {fp[:16]}…)"
        raise IntegrityError(where(path, problem)) from None
    return _statement_digests(path, _parse(path, payload))


def _canonical(hint: str, payload: str, sig: str) -> bytes:
    doc = {"mediaType": BUNDLE_MEDIA_TYPE,
           "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
           "dsseEnvelope": {"payload": payload, "payloadType": PAYLOAD_TYPE,
                            "signatures": [{"sig": sig, "keyid": ""}]}}
    return json.dumps(doc, separators=(",", ":")).encode()


def _statement_digests(path: Path, statement: Any) -> dict[str, str]:
    statement = _obj(path, statement, "the signed statement")
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        raise IntegrityError(where(path, "does not sign an OpenSSF Model Signing v1.0 statement"))
    predicate = _obj(path, statement.get("predicate"), "predicate")
    if predicate.get("serialization") != SERIALIZATION:
        raise IntegrityError(where(path, f"was made with other settings than synthgate's ({SERIALIZATION})"))
    resources = predicate.get("resources")
    if not isinstance(resources, list):
        raise IntegrityError(where(path, "signed statement has no resource list"))
    digests: dict[str, str] = {}
    root_hash = hashlib.sha256()
    for item in resources:
        item = _obj(path, item, "a resource")
        name, digest = item.get("name"), item.get("digest")
        if item.get("algorithm") != "sha256" or not is_sha256(digest) or not _safe_name(name) or name in digests:
            raise IntegrityError(where(path, f"signed resource {short_repr(name)} is malformed or repeated"))
        digests[name] = digest
        root_hash.update(bytes.fromhex(digest))
    # The subject's digest is the hash of the resources' digests in order (model_signing's definition).
    subjects = statement.get("subject")
    if not (isinstance(subjects, list) and len(subjects) == 1 and isinstance(subjects[0], dict)
            and subjects[0].get("digest") == {"sha256": root_hash.hexdigest()}):
        raise IntegrityError(where(path, "signed subject digest does not match the signed resources"))
    return digests


def _parse(path: Path, data: bytes) -> Any:
    # Untrusted bytes: deep nesting raises RecursionError, a huge integer literal ValueError; both are malformed.
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise IntegrityError(where(path, "signature file is not valid JSON")) from None


def _obj(path: Path, value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise IntegrityError(where(path, f"is malformed ({what} is not a JSON object)"))
    return value


def _b64(path: Path, value: Any, what: str) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise IntegrityError(where(path, f"is malformed (the {what} is not base64)")) from None


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _safe_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts and pure.as_posix() == name


def short_repr(value: Any) -> str:
    """repr of an untrusted value, cut so a message stays one readable line."""
    if not isinstance(value, str | float | bool | type(None)):
        return f"<{type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
