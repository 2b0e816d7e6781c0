"""The release pipeline's stages as plain functions over artifact directories, with content-hash caching.

Each stage writes one directory under the release's work dir. A stamp (`.stages/<name>.json`) records the hash
of the stage's inputs (their content hashes) and config; a rerun with the same key reuses the directory, so a
release that crashed resumes after the last finished stage (and training resumes from its last checkpoint).
Prefect tasks in `flows/release.py` are thin wrappers over these; tests call them without Prefect.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from synth.artifacts import atomic_file, read_header
from synth.errors import InputError, where

# The header file of each artifact kind, in the order they are looked for.
_HEADERS = ("dataset.json", "model_card.json", "privacy.json", "utility.json", "summary.json", "report.json")
STAMPS = ".stages"


def artifact_hash(root: Path) -> str:
    """Content hash of an artifact directory, read from its header."""
    for name in _HEADERS:
        if (Path(root) / name).is_file():
            return str(read_header(root, name)["content_hash"])
    raise InputError(where(root, "is not a synthgate artifact (no header found)"))


def stage_key(name: str, inputs: Mapping[str, str], config: Any) -> str:
    """Cache key of a stage: its name, its inputs' content hashes and its config."""
    blob = json.dumps({"stage": name, "inputs": dict(inputs), "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_stage(
    workdir: Path,
    name: str,
    *,
    inputs: Mapping[str, str],
    config: Any,
    build: Callable[[Path], Path],
    on_cached: Callable[[str, Path], None] | None = None,
) -> Path:
    """Run `build(out)` for `workdir/name` unless a finished run with the same key is there.

    An output without a matching stamp is stale (other inputs or config, or a crash between the stage's atomic
    rename and the stamp) and is removed before rebuilding.
    """
    workdir = Path(workdir)
    out = workdir / name
    stamp = workdir / STAMPS / f"{name}.json"
    key = stage_key(name, inputs, config)
    if out.exists() and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if recorded.get("key") == key:
            if on_cached:
                on_cached(name, out)
            return out
    if out.exists():
        shutil.rmtree(out)
    stamp.unlink(missing_ok=True)
    result = Path(build(out))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(stamp) as tmp:
        tmp.write_text(json.dumps({"stage": name, "key": key, "inputs": dict(inputs)}, indent=2, sort_keys=True))
    return result
