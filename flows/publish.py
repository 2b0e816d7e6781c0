"""Publish: move a signed, verified bundle into the releases directory and refresh the catalog index.

The releases directory holds only approved, intact bundles: a bundle is verified against the steward's public key
before it is moved in, and blocked or rejected runs never reach this function. `index.json` and `index.html` are
rebuilt from the bundles actually present (each re-verified), so the index cannot list something that is not there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.keys import PublicKey, fingerprint
from flows.signing import SIGNATURE, verify_bundle
from synth.artifacts import atomic_file
from synth.errors import InputError, IntegrityError, where

INDEX_JSON = "index.json"
INDEX_HTML = "index.html"
_RELEASE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


MAX_RELEASE_ID = 100  # a directory name and a URL segment: well under every filesystem's 255-byte name limit


def check_release_id(release_id: str) -> str:
    """Release ids become directory names and URLs: lower-case letters, digits, '-', '_', '.' only."""
    if not isinstance(release_id, str) or len(release_id) > MAX_RELEASE_ID:
        shown = f"{release_id[:40]!r}… ({len(release_id)} characters)" if isinstance(release_id, str) else (
            repr(release_id))
        raise InputError(f"release id {shown} must be a string of at most {MAX_RELEASE_ID} characters")
    if not release_id or not set(release_id) <= _RELEASE_ID_CHARS or release_id.startswith("."):
        raise InputError(f"release id {release_id!r} must use only a-z, 0-9, '-', '_', '.' and not start with '.'")
    return release_id


def approval_label(approval: Any) -> str:
    """Who approved a release, as its signed predicate records it: 'reviewer NAME', 'automatic (no human
    review)', or 'not recorded' (an older or hand-made bundle). Never assumed to be a human."""
    fields = approval if isinstance(approval, dict) else {}
    if fields.get("auto_approved") is True:
        return "automatic (no human review)"
    reviewer = fields.get("reviewer")
    if fields.get("auto_approved") is False and isinstance(reviewer, str) and reviewer.strip():
        return f"reviewer {reviewer.strip()}"
    return "not recorded"


@dataclass(frozen=True)
class CatalogEntry:
    release_id: str
    path: str
    summary: str
    epsilon: float | None
    delta: float | None
    images: int | None
    fingerprint: str
    created: str | None
    approved_by: str = "not recorded"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def publish(bundle: Path, releases_dir: Path, public_key: PublicKey, *, release_id: str) -> Path:
    """Verify `bundle`, move it to `releases_dir/<release_id>/` and refresh the index. Returns the new path.

    Idempotent: publishing the same signed bundle again (e.g. after a crash between the move and the index) only
    rebuilds the index; a different bundle under a published id is refused."""
    check_release_id(release_id)
    verify_bundle(bundle, public_key, release_id=release_id)
    releases_dir.mkdir(parents=True, exist_ok=True)
    target = releases_dir / release_id
    if target.exists():
        if not _same_bundle(bundle, target, public_key, release_id):
            raise InputError(where(target, "a release with this id is already published"))
    else:
        # Copy next to the target, then rename: the releases dir never shows a half-copied bundle.
        staging = releases_dir / f".{release_id}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle, staging)
        _fsync_tree(staging)
        os.rename(staging, target)
    write_index(releases_dir, public_key)
    return target


def published(releases_dir: Path, public_key: PublicKey, release_id: str) -> Path | None:
    """The intact bundle already published as `release_id` (the index rebuilt to list it), or None.

    A rerun after a crash between moving the bundle in and writing the index finds its release here and repairs
    the index, instead of building a new bundle that the published id would then refuse."""
    target = Path(releases_dir) / check_release_id(release_id)
    if not target.is_dir():
        return None
    try:
        verify_bundle(target, public_key, release_id=release_id)
    except IntegrityError:
        return None
    write_index(Path(releases_dir), public_key)
    return target


def _same_bundle(bundle: Path, target: Path, public_key: PublicKey, release_id: str) -> bool:
    # Equal release.sig files sign equal hashes of every file, hence (both verified) equal contents.
    try:
        if (bundle / SIGNATURE).read_bytes() != (target / SIGNATURE).read_bytes():
            return False
        verify_bundle(target, public_key, release_id=release_id)
    except (OSError, IntegrityError):
        return False
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def scan_releases(releases_dir: Path, public_key: PublicKey) -> tuple[list[CatalogEntry], list[str]]:
    """Verify every bundle under `releases_dir`; return the intact ones and the names of those that failed."""
    entries, failed = [], []
    for child in sorted(p for p in releases_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            result = verify_bundle(child, public_key, release_id=child.name)
        except IntegrityError:
            failed.append(child.name)
            continue
        entries.append(_entry(child.name, result.predicate, result.fingerprint))
    return entries, failed


def _entry(release_id: str, pred: dict[str, Any], fp: str) -> CatalogEntry:
    # The predicate is signed by the steward but still data: take only values of the expected types.
    privacy = pred.get("privacy") if isinstance(pred.get("privacy"), dict) else {}
    synthetic = pred.get("synthetic") if isinstance(pred.get("synthetic"), dict) else {}
    return CatalogEntry(
        release_id=release_id, path=release_id + "/", summary=_typed(pred.get("summary"), str) or "",
        epsilon=_typed(privacy.get("epsilon"), float), delta=_typed(privacy.get("delta"), float),
        images=_typed(synthetic.get("images"), int), fingerprint=fp, created=_typed(pred.get("created"), str),
        approved_by=approval_label(pred.get("approval")),
    )


def _typed(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float if kind is float else kind):
        return None
    return value


def write_index(releases_dir: Path, public_key: PublicKey) -> list[CatalogEntry]:
    """Rebuild `index.json` and `index.html` from the intact bundles present."""
    entries, failed = scan_releases(releases_dir, public_key)
    index = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "public_key_fingerprint": fingerprint(public_key),
        "releases": [e.to_json() for e in entries],
        "hidden_failed_verification": failed,
    }
    with atomic_file(releases_dir / INDEX_JSON) as tmp:
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    with atomic_file(releases_dir / INDEX_HTML) as tmp:
        tmp.write_text(render_index_html(index))
    return entries


_INDEX_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Synthetic image releases</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.4rem;text-align:left}
code{background:#f4f4f4;padding:.1rem .3rem}
</style></head><body>
<h1>Synthetic image releases</h1>
<p>Every release below is synthetic (generated by a diffusion model), audited, approved for release (the "approval"
column says by whom: a named reviewer, or automatically without human review) and signed.
Public key fingerprint: <code>{{ index.public_key_fingerprint }}</code>.</p>
{% if index.releases %}
<table><thead><tr><th>release</th><th>summary</th><th>approval</th><th>images</th><th>privacy</th><th>documents</th>
</tr></thead><tbody>
{% for r in index.releases %}
<tr><td><a href="{{ r.path }}">{{ r.release_id }}</a></td><td>{{ r.summary }}</td><td>{{ r.approved_by }}</td>
<td>{{ r.images or "" }}</td>
<td>{% if r.epsilon is not none %}ε = {{ "%.3g"|format(r.epsilon) }}, δ = {{ "%.1e"|format(r.delta) }}
{% else %}not DP{% endif %}</td>
<td><a href="{{ r.path }}README.md">dataset card</a> · <a href="{{ r.path }}datasheet.md">datasheet</a> ·
<a href="{{ r.path }}report/report.html">audit report</a></td></tr>
{% endfor %}
</tbody></table>
{% else %}<p>No releases yet.</p>{% endif %}
<h2>Verify what you download</h2>
<pre><code>synthgate verify RELEASE_DIR --key release.pub</code></pre>
</body></html>
"""


def render_index_html(index: dict[str, Any]) -> str:
    """The static catalog page (jinja2, autoescaped)."""
    from jinja2 import Environment

    env = Environment(autoescape=True)
    return env.from_string(_INDEX_TEMPLATE).render(index=index)
