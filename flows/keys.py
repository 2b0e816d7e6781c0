"""Ed25519 release keys: generate, load, fingerprint.

The private key signs bundles on the steward's side and never enters a bundle, a log or a Prefect result; only
its path is passed around. The public key (`release.pub`) is what researchers verify with.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from synth.artifacts import atomic_dir
from synth.errors import InputError, where

PRIVATE_NAME = "release.key"
PUBLIC_NAME = "release.pub"


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: how a researcher recognises the steward's key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keys(out: Path, *, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Create `out/` with `release.key` (PKCS#8 PEM, mode 0600, encrypted when a passphrase is given) and
    `release.pub` (SubjectPublicKeyInfo PEM). Refuses to overwrite an existing directory."""
    key = Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with atomic_dir(Path(out)) as tmp:
        os.chmod(tmp, 0o700)
        private = tmp / PRIVATE_NAME
        # Create with 0600 from the start: the key must never be readable by others, not even briefly.
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        (tmp / PUBLIC_NAME).write_bytes(public_pem)
    return Path(out) / PRIVATE_NAME, Path(out) / PUBLIC_NAME


def load_private_key(path: Path, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, with one-line errors for a missing file, wrong passphrase or wrong type."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise InputError(where(path, "key is encrypted: give its passphrase" if passphrase is None
                               else "key is not encrypted: give no passphrase")) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(where(path, "is not a PEM private key, or the passphrase is wrong")) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(where(path, f"is a {type(key).__name__}, not an Ed25519 key"))
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM)."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(where(path, "is not a PEM public key")) from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(where(path, f"is a {type(key).__name__}, not an Ed25519 key"))
    return key


def _read(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InputError(where(path, "no such key file"))
    data = path.read_bytes()
    if not data:
        raise InputError(where(path, "is empty (0 bytes)"))
    return data
