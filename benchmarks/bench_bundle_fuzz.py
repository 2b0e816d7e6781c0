"""Fuzz bundle verification and safe unpacking with seeded mutations; count detections and tracebacks.

A small signed bundle (release id `r-fuzz`) is built once. Each case copies it, applies one seeded mutation and
runs `verify_bundle(copy, key, release_id="r-fuzz")`. A mutation either changes bytes or the file set of the bundle
(`changed`: it must be detected, i.e. raise `IntegrityError`) or re-signs a structurally mutated manifest or
provenance with the steward's key (`re-signed`: a valid signature over odd JSON; it may verify when the JSON still
makes sense, but must never raise anything other than `IntegrityError`). Any other exception is a traceback a user
would see. Mutation kinds:

    byte          flip, insert, delete bytes; truncate; append; in any file, signing files included
    signature     release.sig's structure: keys removed, added, retyped; random JSON values (deeply nested
                  lists, 5,000-digit numbers, NaN, unicode); raw garbage; re-encoded non-canonically; DSSE sig bytes
    files         add, remove, rename, replace by a directory, add an empty directory, add a symbolic link
    re-signed     manifest.json / provenance.json with a structural mutation, signed again with the right key
                  (by model_signing, as `sign_bundle` does)
    tar           (second phase) bytes of the release tar mutated, then `unpack_and_verify`: IntegrityError or
                  InputError only

Prints one markdown row per kind: cases, detected, verified (re-signed only), tracebacks; exits 1 on any
undetected change or traceback.

    .venv/bin/python benchmarks/bench_bundle_fuzz.py [--cases 10000] [--tar-cases 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.catalog.archive import bundle_members, iter_tar
from flows.catalog.fetch import unpack_and_verify
from flows.keys import generate_keys, load_public_key
from flows.model_signature import sign_directory
from flows.signing import MANIFEST, PROVENANCE, SIGNATURE, sign_bundle, verify_bundle
from synth.errors import InputError, IntegrityError

RELEASE_ID = "r-fuzz"


def build_bundle(root: Path, private: Any) -> Path:
    """A small bundle with the real layout: class folders of PNG-like files, metadata, card, report."""
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("normal", "pneumonia")):
        folder = root / "data" / "train" / f"{label:02d}_{cls}"
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"syn-{i:06d}.png").write_bytes(b"\x89PNG" + rng.bytes(200))
    (root / "data" / "train" / "metadata.csv").write_text("file_name,label\n00_normal/syn-000000.png,0\n")
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# card\n")
    (root / "report").mkdir()
    (root / "report" / "summary.json").write_text('{"verdict": {"decision": "pass"}}')
    sign_bundle(root, private, predicate={"release_id": RELEASE_ID, "summary": "fuzz", "privacy": None})
    return root


def random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    """A random JSON value; strings starting with '\\0raw:' are spliced in as raw text by `dumps_raw`."""
    kind = int(rng.integers(0, 10 if depth < 3 else 5))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-2 ** 62, 2 ** 62))
    if kind == 3:
        return float(rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf")]))
    if kind == 4:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, int(rng.integers(0, 40))))
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    if kind == 6:
        return {str(k): random_json(rng, depth + 1) for k in range(int(rng.integers(0, 4)))}
    if kind == 7:
        n = int(rng.integers(500, 200_000))
        return "\0raw:" + "[" * n + "]" * n
    if kind == 8:
        return "\0raw:" + "9" * int(rng.integers(4000, 20_000))
    return "\0raw:" + '{"a":' * 3000 + "1" + "}" * 3000


def dumps_raw(obj: Any, canonical: bool) -> bytes:
    """JSON text of `obj`, with raw splices substituted (invalid or extreme JSON a real encoder would not write)."""
    raws: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("\0raw:"):
            raws.append(value[5:])
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    text = json.dumps(swap(obj), indent=2 if canonical else None, sort_keys=canonical) + ("\n" if canonical else "")
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode()


def mutate_structure(rng: np.random.Generator, obj: Any) -> Any:
    """One structural change somewhere inside a parsed JSON document."""
    if isinstance(obj, dict) and obj and rng.random() < 0.7:
        key = list(obj)[int(rng.integers(0, len(obj)))]
        action = int(rng.integers(0, 4))
        if action == 0:
            del obj[key]
        elif action == 1:
            obj[key] = random_json(rng)
        elif action == 2:
            obj[key + "_x"] = random_json(rng)
        else:
            obj[key] = mutate_structure(rng, obj[key])
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.7:
        i = int(rng.integers(0, len(obj)))
        obj[i] = mutate_structure(rng, obj[i]) if rng.random() < 0.5 else random_json(rng)
        return obj
    return random_json(rng)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def mutate_bytes(rng: np.random.Generator, root: Path) -> None:
    path = _files(root)[int(rng.integers(0, len(_files(root))))]
    data = bytearray(path.read_bytes())
    op = int(rng.integers(0, 5))
    at = int(rng.integers(0, max(1, len(data))))
    if op == 0 and data:
        data[at] ^= int(rng.integers(1, 256))
    elif op == 1:
        data[at:at] = rng.bytes(int(rng.integers(1, 8)))
    elif op == 2 and data:
        del data[at:at + int(rng.integers(1, 8))]
    elif op == 3:
        data = data[:at]
    else:
        data += rng.bytes(int(rng.integers(1, 8)))
    path.write_bytes(bytes(data))


def mutate_signature(rng: np.random.Generator, root: Path) -> None:
    path = root / SIGNATURE
    op = int(rng.integers(0, 4))
    if op == 0:  # raw garbage or extreme JSON instead of the file
        path.write_bytes(dumps_raw(random_json(rng), canonical=bool(rng.integers(0, 2))))
    elif op == 1:  # a structural change, written canonically (only the checks of the content can catch it)
        path.write_bytes(_compact(mutate_structure(rng, json.loads(path.read_text()))))
    elif op == 2:  # the same fields, re-encoded another way
        sig = json.loads(path.read_text())
        path.write_bytes(json.dumps(sig, indent=int(rng.integers(0, 4)), sort_keys=bool(rng.integers(0, 2))).encode())
    else:  # the signature bytes themselves
        sig = json.loads(path.read_text())
        entry = sig["dsseEnvelope"]["signatures"][0]
        raw = bytearray(base64.b64decode(entry["sig"]))
        raw[int(rng.integers(0, len(raw)))] ^= int(rng.integers(1, 256))
        entry["sig"] = base64.b64encode(bytes(raw)).decode()
        path.write_bytes(_compact(sig))


def _compact(value: Any) -> bytes:
    """JSON as model_signing writes release.sig (compact), so only checks of the content can catch a change."""
    return json.dumps(value, separators=(",", ":")).encode()


def mutate_files(rng: np.random.Generator, root: Path) -> None:
    files = _files(root)
    path = files[int(rng.integers(0, len(files)))]
    op = int(rng.integers(0, 6))
    if op == 0:
        (path.parent / "extra.bin").write_bytes(rng.bytes(10))
    elif op == 1:
        path.unlink()
    elif op == 2:
        path.rename(path.with_name(path.name + ".renamed"))
    elif op == 3:
        path.unlink()
        path.mkdir()
        (path / "inner").write_bytes(b"x")
    elif op == 4:
        (path.parent / "empty-dir").mkdir()
    else:
        os.symlink(path.name, path.parent / "link")


def resign(rng: np.random.Generator, root: Path, private: Any) -> None:
    name = MANIFEST if rng.random() < 0.5 else PROVENANCE
    (root / name).write_bytes(dumps_raw(mutate_structure(rng, json.loads((root / name).read_text())),
                                        canonical=bool(rng.integers(0, 2))))
    sign_directory(root, private)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """What a change is measured against: every entry's relative path and bytes (or kind)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def run_bundle_phase(cases: int, seed: int, original: Path, public: Any, private: Any, work: Path) -> dict:
    kinds = ("byte", "signature", "files", "re-signed")
    stats: dict[str, Counter] = {k: Counter() for k in kinds}
    before = snapshot(original)
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        kind = kinds[i % len(kinds)]
        root = work / f"b{i}"
        shutil.copytree(original, root, symlinks=True)
        {"byte": mutate_bytes, "signature": mutate_signature, "files": mutate_files,
         "re-signed": lambda r, p: resign(r, p, private)}[kind](rng, root)
        changed = snapshot(root) != before
        stats[kind]["cases"] += 1
        try:
            verify_bundle(root, public, release_id=RELEASE_ID)
            outcome = "verified" if kind == "re-signed" or not changed else "UNDETECTED"
        except IntegrityError:
            outcome = "detected"
        except Exception as e:  # counted, not raised: finding these is the point
            outcome = "traceback"
            print(f"traceback in case {i} ({kind}): {e.__class__.__name__}", file=sys.stderr)
            traceback.print_exc(limit=3)
        stats[kind][outcome] += 1
        stats[kind]["no-op" if not changed else "changed"] += 1
        shutil.rmtree(root)
    return stats


def run_tar_phase(cases: int, seed: int, original: Path, public: Any, work: Path) -> Counter:
    verified = verify_bundle(original, public, release_id=RELEASE_ID)
    tar = b"".join(iter_tar(bundle_members(original, RELEASE_ID, verified.manifest, verified.signing_files)))
    stats: Counter = Counter()
    for i in range(cases):
        rng = np.random.default_rng([seed, 1_000_000 + i])
        data = bytearray(tar)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        archive = work / f"t{i}.tar"
        archive.write_bytes(bytes(data))
        out = work / f"t{i}"
        stats["cases"] += 1
        try:
            unpack_and_verify(archive, RELEASE_ID, out, public, max_bytes=10_000_000)
            stats["verified"] += 1  # a flipped byte in padding or an unused header field changes nothing signed
            shutil.rmtree(out)
        except (IntegrityError, InputError):
            stats["detected"] += 1
        except Exception as e:  # counted, not raised: finding these is the point
            stats["traceback"] += 1
            print(f"traceback in tar case {i}: {e.__class__.__name__}", file=sys.stderr)
            traceback.print_exc(limit=3)
        archive.unlink()
        if out.exists() and stats["traceback"]:
            shutil.rmtree(out)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--tar-cases", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bundle-fuzz-") as tmp:
        tmp_path = Path(tmp)
        private_path, public_path = generate_keys(tmp_path / "keys")
        private, public = private_path, load_public_key(public_path)
        original = build_bundle(tmp_path / "original", private)
        work = tmp_path / "work"
        work.mkdir()
        t0 = time.perf_counter()
        stats = run_bundle_phase(args.cases, args.seed, original, public, private, work)
        t1 = time.perf_counter()
        tar_stats = run_tar_phase(args.tar_cases, args.seed, original, public, work)
        t2 = time.perf_counter()
    print("| kind | cases | changed | detected | verified (re-signed / unchanged) | undetected | tracebacks |")
    print("|---|---|---|---|---|---|---|")
    for kind, c in stats.items():
        print(f"| {kind} | {c['cases']} | {c['changed']} | {c['detected']} | {c['verified']} | {c['UNDETECTED']} "
              f"| {c['traceback']} |")
    print(f"| tar (unpack + verify) | {tar_stats['cases']} | {tar_stats['cases']} | {tar_stats['detected']} | "
          f"{tar_stats['verified']} | – | {tar_stats['traceback']} |")
    print(f"\nbundle phase {t1 - t0:.1f} s, tar phase {t2 - t1:.1f} s (seed {args.seed})")
    bad = sum(c["UNDETECTED"] + c["traceback"] for c in stats.values()) + tar_stats["traceback"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
