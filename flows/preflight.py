"""Check a release config completely before any stage runs: every error a config can hold, found in a second.

The pipeline takes minutes to hours; a release id that cannot be published, a missing source or CSV, or a key that
cannot be loaded must not surface only after training. `check_release_config` runs what can be checked without
reading pixels: the release id, the signing key (and its passphrase), the source (the file or folder exists, an
`.npz`'s declared arrays, a folder's CSV manifest) and the output directories. It raises the same one-line
`InputError`/`ConfigError` a stage would.
"""

from __future__ import annotations

from pathlib import Path

from flows.release_config import ReleaseConfig
from synth.errors import InputError, where


def check_release_config(cfg: ReleaseConfig) -> None:
    """Raise the first problem of `cfg` that can be found without running a stage."""
    from flows.publish import check_release_id

    if cfg.release_id is not None:
        check_release_id(cfg.release_id)
    _check_key(cfg)
    _check_source(cfg)
    for name, path in (("workdir", cfg.workdir), ("releases_dir", cfg.releases_dir)):
        if Path(path).exists() and not Path(path).is_dir():
            raise InputError(where(path, f"{name} exists and is not a directory"))


def _check_key(cfg: ReleaseConfig) -> None:
    from flows.keys import load_private_key
    from flows.stage_release import passphrase

    if not Path(cfg.private_key).is_file():
        raise InputError(where(cfg.private_key, "no signing key; create one with `synthgate keys generate --out DIR`"))
    load_private_key(cfg.private_key, passphrase=passphrase(cfg))


def _check_source(cfg: ReleaseConfig) -> None:
    from synth.data.ingest import SourceFormat, detect_format

    src = cfg.source
    path = Path(src.path).expanduser()
    fmt = SourceFormat(src.format)
    if fmt is SourceFormat.AUTO:
        fmt = detect_format(path, src.csv)
    if fmt is SourceFormat.MEDMNIST:
        _check_npz(src.path)
        return
    if src.csv is None:
        raise InputError(where(src.path, f"the {fmt.value} format needs source.csv"))
    from synth.data.manifest import read_manifest

    # The CSV is small: reading it checks columns, labels, splits, PHI and that every listed file exists.
    read_manifest(Path(src.csv), path, class_names=src.classes)


def _check_npz(name_or_path: str) -> None:
    from synth.data.limits import check_npz_size
    from synth.data.locate import data_dir
    from synth.data.medmnist import KNOWN

    path = Path(name_or_path).expanduser()
    if not path.exists() and path.suffix != ".npz" and "/" not in name_or_path:
        if name_or_path.lower() not in KNOWN:
            raise InputError(where(name_or_path, f"no such file, and not a known MedMNIST set ({', '.join(KNOWN)})"))
        path = data_dir() / f"{name_or_path.lower()}.npz"
        if not path.exists():
            return  # a known set is downloaded (and its md5 checked) by the ingest stage
    if not path.is_file():
        raise InputError(where(path, "no such file"))
    check_npz_size(path)
