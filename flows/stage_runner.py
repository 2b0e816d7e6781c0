"""How a release stage runs: content-hash caching (`run_stage`), the work dir's stage names, and what every stage
module shares (typed config sections, progress bars only at a terminal)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from synth import layout
from synth.artifacts import atomic_file, read_header
from synth.config import build
from synth.errors import InputError, where
from synth.progress import phase

T = TypeVar("T", bound=BaseModel)

# Where each finished stage records its cache key (`<workdir>/.stages/<name>.json`).
STAMPS = ".stages"


def artifact_hash(root: Path) -> str:
    """Content hash of an artifact directory, read from its header (a known header name first, else the one
    top-level JSON file that is a synthgate header)."""
    for name in layout.ARTIFACT_HEADERS:
        if (Path(root) / name).is_file():
            return str(read_header(root, name)["content_hash"])
    for candidate in sorted(Path(root).glob("*.json")):
        with contextlib.suppress(InputError):
            return str(read_header(root, candidate.name)["content_hash"])
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
    extra_outputs: Sequence[Path] = (),
    on_cached: Callable[[str, Path], None] | None = None,
) -> Path:
    """Run `build(out)` for `workdir/name` unless a finished run with the same key is there.

    An output without a matching stamp is stale (other inputs or config, or a crash between the stage's atomic
    rename and the stamp) and is removed before rebuilding, with any `extra_outputs` the stage also writes.
    """
    workdir = Path(workdir)
    out = workdir / name
    stamp = workdir / STAMPS / f"{name}.json"
    key = stage_key(name, inputs, config)
    if out.exists() and all(p.exists() for p in extra_outputs) and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if recorded.get("key") == key:
            if on_cached:
                on_cached(name, out)
            phase(name, "reused (same inputs and config)")
            return out
    for stale in (out, *extra_outputs):
        if stale.exists():
            shutil.rmtree(stale)
    stamp.unlink(missing_ok=True)
    # Every stage says when it starts and ends (Prefect logs, and stderr without a terminal): audit phases
    # without countable units are otherwise silent.
    phase(name, "started")
    started = time.monotonic()
    result = Path(build(out))
    phase(name, f"done in {time.monotonic() - started:.0f} s")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(stamp) as tmp:
        tmp.write_text(json.dumps({"stage": name, "key": key, "inputs": dict(inputs)}, indent=2, sort_keys=True))
    return result


# The stages' directories (and the verdict file) under the release's work dir.
DATASET, VALIDATION, MODEL, SYNTHETIC = "dataset", "validation", "model", "synthetic"
PRIVACY, RELEASED, UTILITY = "audit-privacy", "synthetic-released", "audit-utility"
PRIVACY_REFERENCE = "audit-privacy-reference"
GUIDANCE = "guidance-selection"
REPORT, PUBLIC_REPORT, VERDICT, BUNDLE = "report", "report-public", "verdict.json", "bundle"


def shard_name(stage: str, index: int, count: int) -> str:
    """Directory of one shard of a mapped stage, e.g. `synthetic-shard-0-of-2`."""
    return f"{stage}-shard-{index}-of-{count}"


def build_config(cls: type[T], data: Mapping[str, Any], name: str) -> T:
    """A stage's typed config from the release file's mapping (errors name the section)."""
    return build(cls, data, source=f"release config [{name}]")


def interactive() -> bool:
    """No tqdm bars inside the flow: tasks run concurrently (the privacy reference trains beside the generator) and
    their bars would garble each other. Their progress is logged instead (`synth.progress`: throttled lines that
    `flows.release` routes to stderr and to the run's Prefect logs)."""
    return False
