"""What a published release says about itself, for `synthgate releases list|show|diff`.

Read from the bundle's own files: the provenance predicate (config, policy, ε, approval, gate), the public audit
summary (`report/summary.json`: key numbers) and the manifest (images per class). Without a public key these are
read as they are on disk and labelled unverified; with one, the bundle is verified first and what is shown is what
was verified. Nothing here reads pixels.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from flows.keys import PublicKey
from flows.publish import approval_label
from flows.signing import MANIFEST, PROVENANCE, verify_bundle
from synth.errors import InputError

SUMMARY = "report/summary.json"


@dataclass(frozen=True)
class KeyNumber:
    """One number of the public audit summary (e.g. membership AUC), as the report judged it."""

    label: str
    value: float | None
    display: str
    status: str


@dataclass(frozen=True)
class ReleaseInfo:
    """The facts of one release bundle that a steward compares between releases."""

    release_id: str
    root: str
    verified_by: str | None  # the key fingerprint it verified under; None when not checked
    created: str | None
    summary: str
    approval: str
    gate: str | None
    epsilon: float | None
    delta: float | None
    accountant: str | None
    class_counts: dict[str, int]
    key_numbers: dict[str, KeyNumber] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (key numbers as plain dicts)."""
        return asdict(self)


def release_dirs(releases_dir: Path) -> list[Path]:
    """The bundle directories of a releases directory (those holding a provenance), sorted by name."""
    if not releases_dir.is_dir():
        raise InputError(f"{releases_dir}: releases directory does not exist")
    return sorted(p for p in releases_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / PROVENANCE).is_file())


def locate(release: str, releases_dir: Path | None) -> Path:
    """A release named by its directory, or by its id inside `releases_dir`."""
    path = Path(release)
    if releases_dir is not None and not path.is_dir():
        path = releases_dir / release
    if not path.is_dir():
        where = f" in {releases_dir}" if releases_dir is not None else " (give its directory, or --releases DIR)"
        raise InputError(f"{release}: no such release{where}")
    return path


def read_release(root: Path, public_key: PublicKey | None = None) -> ReleaseInfo:
    """The release in `root`; with `public_key`, verified first (IntegrityError when it does not verify)."""
    if public_key is not None:
        verified = verify_bundle(root, public_key)
        pred, manifest, fp = verified.predicate, verified.manifest, verified.fingerprint
    else:
        statement = _json_file(root / PROVENANCE)
        pred, fp = _dict(statement.get("predicate")), None
        manifest = _json_file(root / MANIFEST) if (root / MANIFEST).is_file() else {}
    summary = _json_file(root / SUMMARY) if (root / SUMMARY).is_file() else {}
    privacy = _dict(pred.get("privacy"))
    config = _dict(pred.get("config"))
    policy = _dict(config.pop("policy", None))
    return ReleaseInfo(
        release_id=_text(pred.get("release_id")) or root.name, root=str(root), verified_by=fp,
        created=_text(pred.get("created")), summary=_text(pred.get("summary")) or "",
        approval=approval_label(pred.get("approval")), gate=_text(pred.get("gate")),
        epsilon=_num(privacy.get("epsilon")), delta=_num(privacy.get("delta")),
        accountant=_text(privacy.get("accountant")), class_counts=class_counts(manifest),
        key_numbers=_key_numbers(summary), policy=policy, config=config,
    )


def class_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """Images per class actually listed in a bundle's manifest: data/<split>/<index>_<class>/<file>.png."""
    counts: Counter[str] = Counter()
    files = manifest.get("files")
    for f in files if isinstance(files, list) else []:
        parts = PurePosixPath(str(f.get("path", "") if isinstance(f, dict) else "")).parts
        if len(parts) == 4 and parts[0] == "data" and parts[3].lower().endswith(".png"):
            counts[parts[2].split("_", 1)[-1]] += 1
    return dict(sorted(counts.items()))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys ({"train": {"lr": 1e-3}} → {"train.lr": 1e-3}); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two nested dicts (absent on one side: None)."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def diff(a: ReleaseInfo, b: ReleaseInfo) -> dict[str, Any]:
    """Everything that differs between two releases, by section; key numbers are listed whole (side by side)."""
    numbers = {}
    for key in list(a.key_numbers) + [k for k in b.key_numbers if k not in a.key_numbers]:
        na, nb = a.key_numbers.get(key), b.key_numbers.get(key)
        delta = nb.value - na.value if na and nb and na.value is not None and nb.value is not None else None
        numbers[key] = {"label": (na or nb).label,  # type: ignore[union-attr]
                        "a": na.display if na else None, "b": nb.display if nb else None, "change": delta}
    classes = sorted(a.class_counts.keys() | b.class_counts.keys())
    return {
        "a": a.release_id, "b": b.release_id,
        "key_numbers": numbers,
        "privacy": {k: v for k, v in {"epsilon": (a.epsilon, b.epsilon), "delta": (a.delta, b.delta),
                                      "accountant": (a.accountant, b.accountant)}.items() if v[0] != v[1]},
        "counts": {c: (a.class_counts.get(c, 0), b.class_counts.get(c, 0)) for c in classes},
        "approval": (a.approval, b.approval) if a.approval != b.approval else None,
        "gate": (a.gate, b.gate) if a.gate != b.gate else None,
        "policy": changed(a.policy, b.policy),
        "config": changed(a.config, b.config),
    }


def _key_numbers(summary: dict[str, Any]) -> dict[str, KeyNumber]:
    numbers = summary.get("key_numbers")
    out = {}
    for n in numbers if isinstance(numbers, list) else []:
        if isinstance(n, dict) and _text(n.get("key")):
            out[str(n["key"])] = KeyNumber(label=_text(n.get("label")) or str(n["key"]), value=_num(n.get("value")),
                                           display=_text(n.get("display")) or "", status=_text(n.get("status")) or "")
    return out


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing: not a release bundle") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) and value != "" \
        else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
