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

from flows.release_config import ReleaseConfig
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


# ---------------------------------------------------------------------------------------------------------------
# The stages of a release, in pipeline order. Each returns the path of the artifact it wrote (or reused).
# ---------------------------------------------------------------------------------------------------------------

DATASET, VALIDATION, MODEL, SYNTHETIC = "dataset", "validation", "model", "synthetic"
PRIVACY, RELEASED, UTILITY = "audit-privacy", "synthetic-released", "audit-utility"
REPORT, PUBLIC_REPORT, VERDICT, BUNDLE = "report", "report-public", "verdict.json", "bundle"


def ingest_stage(cfg: ReleaseConfig) -> Path:
    """The real dataset, in canonical form."""
    from synth.data.ingest import ingest

    src = cfg.source
    source_id = _source_identity(src.path, src.csv)
    return run_stage(
        cfg.workdir, DATASET, inputs={"source": source_id}, config=src.model_dump(mode="json"),
        build=lambda out: ingest(
            src.path, out, csv=src.csv, fmt=src.format, size=src.size, channels=src.channels,
            duplicate_policy=src.duplicates,
        ),
    )


def _source_identity(path: str, csv: Path | None) -> str:
    """What identifies a source for caching: the file's hash, or a folder's listing (names, sizes, mtimes)."""
    from synth.artifacts import sha256_file
    from synth.data.medmnist import resolve

    p = Path(path)
    if not p.exists() and p.suffix != ".npz":
        p = resolve(path)
    if p.is_file():
        ident = sha256_file(p)
    elif p.is_dir():
        listing = sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in p.rglob("*") if f.is_file())
        ident = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    else:
        raise InputError(where(p, "no such file or directory"))
    if csv is not None:
        ident += ":" + sha256_file(csv) if Path(csv).is_file() else ""
    return ident


def validate_stage(cfg: ReleaseConfig, dataset: Path) -> Path:
    """Validation report of the real dataset; raises ValidationFailed (exit 1) on a blocking finding."""
    from synth.data.validate import load_report, validate_dataset

    out = run_stage(
        cfg.workdir, VALIDATION, inputs={"dataset": artifact_hash(dataset)},
        config={"min_per_class": cfg.source.min_per_class},
        build=lambda out: validate_dataset(dataset, out, min_per_class=cfg.source.min_per_class).out or out,
    )
    load_report(out / "report.json").raise_for_blocking()
    return out


def train_stage(cfg: ReleaseConfig, dataset: Path) -> Path:
    """The generator. A crashed run resumes from its checkpoint (same config ⇒ same weights)."""
    from synth.training import train

    train_cfg = cfg.train.model_copy(update={"device": cfg.device})
    config = {"train": train_cfg.model_dump(mode="json"), "dp": cfg.dp.model_dump(mode="json")}

    def build(out: Path) -> Path:
        privacy = _dp_strategy(cfg, dataset) if cfg.dp.enabled else None
        ckpt = out.parent / f"{out.name}.ckpt"
        return train(dataset, out, train_cfg, privacy=privacy, resume=ckpt.exists(), checkpoint_dir=ckpt,
                     progress=False)

    return run_stage(cfg.workdir, MODEL, inputs={"dataset": artifact_hash(dataset)}, config=config, build=build)


def _dp_strategy(cfg: ReleaseConfig, dataset: Path) -> Any:
    from privacy.dp import DPConfig, make_strategy
    from synth.data.canonical import load_dataset

    dp = cfg.dp
    n_train = int(load_dataset(dataset).header["counts"]["train"])
    return make_strategy(
        DPConfig(target_epsilon=dp.epsilon, target_delta=dp.delta, max_grad_norm=dp.max_grad_norm,
                 accountant=dp.accountant, noise_multiplicity=dp.noise_multiplicity,
                 max_physical_batch_size=dp.max_physical_batch_size),
        dataset_size=n_train,
    )


def generate_stage(cfg: ReleaseConfig, model: Path) -> Path:
    """The synthetic set, every image's seed recorded."""
    from synth.generate import generate
    from synth.sampling import DEFAULT_SAMPLER

    g = cfg.generate
    config = {**g.model_dump(mode="json"), "sampler": g.sampler or DEFAULT_SAMPLER}
    return run_stage(
        cfg.workdir, SYNTHETIC, inputs={"model": artifact_hash(model)}, config=config,
        build=lambda out: generate(
            model, out, n=None if g.per_class else g.n, per_class=g.per_class, sampler=g.sampler or DEFAULT_SAMPLER,
            steps=g.steps, guidance_scale=g.guidance_scale, batch_size=g.batch_size, seed=g.seed,
            device=cfg.device, progress=False,
        ),
    )
