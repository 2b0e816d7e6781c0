"""ECDSA P-256 release keys: generate, load, fingerprint.

Bundles are signed per OpenSSF Model Signing v1.0, whose algorithm registry has elliptic-curve keys and no
Ed25519: `model_signing` accepts NIST P-256, P-384 and P-521 keys, and `synthgate keys generate` writes P-256.
Keys made by synthgate 0.1 (Ed25519) are refused with one line that says how to make a new pair.

The private key signs bundles on the steward's side and never enters a bundle, a log or a Prefect result; only
its path is passed around. The public key (`release.pub`) is what researchers verify with.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from synth.artifacts import atomic_dir
from synth.errors import InputError, where

PRIVATE_NAME = "release.key"
PUBLIC_NAME = "release.pub"
# The curves model_signing signs and verifies with (its `_check_supported_ec_key`); we generate the first.
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
PublicKey = ec.EllipticCurvePublicKey
PrivateKey = ec.EllipticCurvePrivateKey
_ED25519 = "is an Ed25519 key (synthgate 0.1); releases are now signed per OpenSSF Model Signing with ECDSA P-256"
_ED25519_PRIVATE = f"{_ED25519}: run 'synthgate keys generate --out NEW_DIR', sign with it and publish its release.pub"
_ED25519_PUBLIC = f"{_ED25519}: verify with the publisher's new (ECDSA) release.pub"


def public_pem(public_key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key (the bytes `release.pub` holds)."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(public_key: PublicKey) -> str:
    """sha256 of the public key's PEM, hex: the key `hint` model_signing writes into release.sig, so a
    researcher can match the two (and `sha256sum release.pub` gives the same value)."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def generate_keys(out: Path, *, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Create `out/` with `release.key` (ECDSA P-256, PKCS#8 PEM, mode 0600, encrypted when a passphrase is
    given) and `release.pub` (SubjectPublicKeyInfo PEM). Refuses to overwrite an existing directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    with atomic_dir(Path(out)) as tmp:
        os.chmod(tmp, 0o700)
        private = tmp / PRIVATE_NAME
        # Create with 0600 from the start: the key must never be readable by others, not even briefly.
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        (tmp / PUBLIC_NAME).write_bytes(public_pem(key.public_key()))
    return Path(out) / PRIVATE_NAME, Path(out) / PUBLIC_NAME


def load_private_key(path: Path, *, passphrase: bytes | None = None) -> PrivateKey:
    """Load an ECDSA private key, with one-line errors for a missing file, wrong passphrase or wrong type."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise InputError(where(path, "key is encrypted: give its passphrase" if passphrase is None
                               else "key is not encrypted: give no passphrase")) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(where(path, "is not a PEM private key, or the passphrase is wrong")) from None
    if isinstance(key, Ed25519PrivateKey):
        raise InputError(where(path, _ED25519_PRIVATE))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(where(path, f"is a {type(key).__name__}, not an ECDSA P-256 key"))
    _check_curve(path, key.curve)
    return key


def load_public_key(path: Path) -> PublicKey:
    """Load an ECDSA public key (PEM)."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(where(path, "is not a PEM public key")) from None
    if isinstance(key, Ed25519PublicKey):
        raise InputError(where(path, _ED25519_PUBLIC))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(where(path, f"is a {type(key).__name__}, not an ECDSA P-256 key"))
    _check_curve(path, key.curve)
    return key


def _check_curve(path: Path, curve: ec.EllipticCurve) -> None:
    if curve.name not in SUPPORTED_CURVES:
        raise InputError(where(path, f"is an ECDSA key on curve {curve.name}; OpenSSF Model Signing supports "
                                     f"{', '.join(SUPPORTED_CURVES)} (synthgate keys generate writes secp256r1)"))


def _read(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InputError(where(path, "no such key file"))
    data = path.read_bytes()
    if not data:
        raise InputError(where(path, "is empty (0 bytes)"))
    return data
