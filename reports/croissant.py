"""croissant.json: Croissant 1.1 metadata (with Responsible-AI fields) for the bundle, and its validation.

Built by hand as JSON-LD rather than through mlcroissant's object model because mlcroissant 1.1.1 writes
`conformsTo` as 1.0 by default and spells one RAI property `rai:dataDataManipulationProtocol`; the RAI vocabulary
says `rai:dataManipulationProtocol`, which is what we write (mlcroissant ignores the property it does not know, so
validation is unaffected). Paths (`contentUrl`, `includes`) are relative to the bundle root, where croissant.json
lives.

Records: one RecordSet `images` keyed by `file_name`. The key field is taken from each PNG's path in the FileSet
(regex-stripped to the path relative to data/train/) and `references` the `file_name` column of metadata.csv,
which makes mlcroissant join the PNGs with the CSV rows; `label` and the attribute columns come from the CSV and
`image` is the PNG's content. A second RecordSet `classes` lists label index -> class name.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from reports.bundle_layout import METADATA_CSV, PNG_GLOB, SPLIT_DIR
from reports.dataset_card import image_description, license_url, privacy_statement
from reports.facts import ReleaseFacts
from synth.artifacts import sha256_file
from synth.errors import InputError, where

CONFORMS_TO = "http://mlcommons.org/croissant/1.1"
RECORD_SET = "images"
CLASSES_SET = "classes"

# The standard Croissant @context (as mlcroissant checks it) plus the 1.1 terms.
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isArray": "cr:isArray",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

_DTYPES = {"int64": "sc:Integer", "float64": "sc:Float", "bool": "sc:Boolean", "string": "sc:Text"}


def _rai(facts: ReleaseFacts) -> dict[str, Any]:
    """Responsible-AI properties (Croissant RAI vocabulary spelling)."""
    f = facts
    src = f.source
    audit = ""
    if f.privacy_audit is not None:
        a = f.privacy_audit
        bits = []
        if a.flagged_fraction_before is not None:
            bits.append(f"{a.flagged_fraction_before:.2%} of generated images flagged as near-copies before filtering")
        if a.flagged_fraction_after is not None:
            bits.append(f"{a.flagged_fraction_after:.2%} after")
        if a.membership_auc is not None:
            bits.append(f"membership-inference AUC {a.membership_auc:.3f}")
        audit = " Memorisation audit: " + ", ".join(bits) + "." if bits else ""
    approval = (
        "no approval recorded"
        if f.approval is None
        else (
            f"{f.approval.decision}: auto-approved (scripted run), no human review"
            if f.approval.auto_approved
            else f"{f.approval.decision} by {f.approval.reviewer} (human review)"
        )
    )
    return {
        "rai:dataCollection": (
            f"Generated, not collected: {f.synthetic.total} images sampled from a {f.model.architecture} "
            f"(model content hash {f.model.content_hash}) trained on the real dataset {src.name} "
            f"(content hash {src.content_hash}"
            + (f", file sha256 {src.file_sha256}" if src.file_sha256 else "")
            + ")."
            + (f" Sampler: {f.synthetic.sampler}." if f.synthetic.sampler else "")
        ),
        "rai:dataCollectionType": ["Synthetic data generation"],
        "rai:dataCollectionRawData": (
            f"The real images ({src.name}: {src.counts.get('total', 'n/a')} images"
            + (f"; original source {src.original_source}" if src.original_source else "")
            + ") are not included and stay with the data steward."
        ),
        "rai:dataPreprocessingProtocol": [
            f"Source ingested to a canonical {src.image.height}x{src.image.width} form and validated"
            + (f"; exact duplicates: policy {src.duplicates.policy}, {src.duplicates.removed} removed"
               if src.duplicates else "")
            + ".",
            "Synthetic pixels written losslessly as PNG without metadata chunks.",
        ],
        "rai:dataManipulationProtocol": (
            privacy_statement(f)
            + audit
            + f" Release gate verdict: {f.gate.verdict}. Approval: {approval}."
        ),
        "rai:dataAnnotationProtocol": [
            "Labels are the class each image was generated for (the generator's conditioning input); no human "
            "annotated the synthetic images."
        ],
        "rai:machineAnnotationTools": [f"synthgate {f.synthgate_version}"],
        "rai:dataUseCases": [
            "Method development, teaching and pipeline benchmarking for image classification of "
            + " vs. ".join(f.class_names)
            + ".",
            "Not for diagnosis, clinical decisions, or validating a medical device.",
        ],
        "rai:dataBiases": [
            f"Inherits the biases of {src.name} (acquisition sites, population, class balance).",
            "The generator may under-represent rare presentations (mode collapse) or produce images that do not "
            "show their class.",
        ],
        "rai:dataLimitations": [
            f"Synthetic {image_description(f)} images; not clinical images.",
            "Utility audits use one small classifier and one split; they indicate, they do not certify.",
        ],
        "rai:personalSensitiveInformation": [
            "No real patient image, identifier or metadata is included. The images are derived from medical images; "
            + privacy_statement(f)
        ],
        "rai:dataSocialImpact": (
            "Lets researchers outside the institution work with realistic images without access to patients' data; "
            "misuse as clinical evidence could cause harm."
        ),
        "rai:dataReleaseMaintenancePlan": (
            f"Release {f.release_id} is signed and immutable; corrections are published as new releases."
        ),
    }


def build_croissant(facts: ReleaseFacts, data_dir: Path, *, root: Path | None = None) -> dict[str, Any]:
    """The Croissant JSON-LD for a bundle whose data folder is `data_dir` (croissant.json goes in `root`,
    default `data_dir.parent`). Reads metadata.csv to record its sha256 and size."""
    data_dir = Path(data_dir)
    root = Path(root) if root is not None else data_dir.parent
    csv_path = root / METADATA_CSV
    if not csv_path.is_file():
        raise InputError(where(csv_path, "missing; write the bundle's data before its Croissant metadata"))
    lic = facts.release_license
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "name": facts.title,
        "description": (
            f"Synthetic dataset: {facts.synthetic.total} {image_description(facts)} images generated by a "
            f"diffusion model trained on {facts.source.name}. No real image is included. {privacy_statement(facts)}"
        ),
        "conformsTo": CONFORMS_TO,
        "citeAs": f"{facts.title}, release {facts.release_id}, generated with synthgate {facts.synthgate_version}"
        + (f". Source: {facts.source.attribution}" if facts.source.attribution else ""),
        "creator": {"@type": "sc:Organization", "name": facts.publisher or "synthgate"},
        "datePublished": facts.created.date().isoformat(),
        "dateCreated": facts.created.isoformat(),
        "keywords": ["synthetic data", "medical imaging", "image classification", "diffusion model"]
        + (["differential privacy"] if facts.privacy.dp else []),
        "license": license_url(lic) or lic,
        "version": facts.version,
        "isBasedOn": f"{facts.source.name} (content hash {facts.source.content_hash})",
        **({"url": facts.homepage} if facts.homepage else {}),
        **_rai(facts),
        "distribution": _distribution(csv_path),
        "recordSet": _record_sets(facts),
    }
    return doc


def _distribution(csv_path: Path) -> list[dict[str, Any]]:
    """The bundle's files: metadata.csv (with its sha256 and size) and the PNG file set."""
    return [
        {
            "@type": "cr:FileObject",
            "@id": "metadata-csv",
            "name": "metadata.csv",
            "description": "One row per image: file_name, label and attribute columns.",
            "contentUrl": METADATA_CSV,
            "contentSize": f"{csv_path.stat().st_size} B",
            "encodingFormat": "text/csv",
            "sha256": sha256_file(csv_path),
        },
        {
            "@type": "cr:FileSet",
            "@id": "png-files",
            "name": "png-files",
            "description": "The synthetic images, one folder per class.",
            "encodingFormat": "image/png",
            "includes": PNG_GLOB,
        },
    ]


def _record_sets(facts: ReleaseFacts) -> list[dict[str, Any]]:
    """The class enumeration and the per-image record set."""
    return [
        {
            "@type": "cr:RecordSet",
            "@id": CLASSES_SET,
            "name": CLASSES_SET,
            "description": "Label index to class name.",
            "dataType": "sc:Enumeration",
            "key": {"@id": f"{CLASSES_SET}/index"},
            "field": [
                {"@type": "cr:Field", "@id": f"{CLASSES_SET}/index", "name": "index", "dataType": "sc:Integer"},
                {"@type": "cr:Field", "@id": f"{CLASSES_SET}/name", "name": "name", "dataType": "sc:Text"},
            ],
            "data": [
                {f"{CLASSES_SET}/index": i, f"{CLASSES_SET}/name": n} for i, n in enumerate(facts.class_names)
            ],
        },
        {
            "@type": "cr:RecordSet",
            "@id": RECORD_SET,
            "name": RECORD_SET,
            "description": "One record per synthetic image.",
            "key": {"@id": f"{RECORD_SET}/file_name"},
            "field": _fields(facts),
        },
    ]


def _fields(facts: ReleaseFacts) -> list[dict[str, Any]]:
    """The per-image record set's fields: file name (the join key), image, label, then each metadata column."""
    prefix = re.escape(f"{SPLIT_DIR}/")
    csv_ref = {"@id": "metadata-csv"}
    fields: list[dict[str, Any]] = [
        {
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/file_name",
            "name": "file_name",
            "description": f"Path of the PNG relative to {SPLIT_DIR}/ (the join key with metadata.csv).",
            "dataType": "sc:Text",
            # The optional prefix makes the regex idempotent: mlcroissant applies it again when joining.
            "source": {
                "fileSet": {"@id": "png-files"},
                "extract": {"fileProperty": "fullpath"},
                "transform": {"regex": f"^(?:{prefix})?(.*)$"},
            },
            "references": {"fileObject": csv_ref, "extract": {"column": "file_name"}},
        },
        {
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/image",
            "name": "image",
            "description": f"The synthetic image ({image_description(facts)}).",
            "dataType": "sc:ImageObject",
            "source": {"fileSet": {"@id": "png-files"}, "extract": {"fileProperty": "content"}},
        },
        {
            "@type": "cr:Field",
            "@id": f"{RECORD_SET}/label",
            "name": "label",
            "description": "Class index: "
            + ", ".join(f"{i} = {n}" for i, n in enumerate(facts.class_names))
            + " (see the 'classes' record set). The class the generator was conditioned on.",
            "dataType": "sc:Integer",
            "source": {"fileObject": csv_ref, "extract": {"column": "label"}},
        },
    ]
    for col, dtype in facts.synthetic.columns.items():
        fields.append(
            {
                "@type": "cr:Field",
                "@id": f"{RECORD_SET}/{col}",
                "name": col,
                "description": f"Column {col} of metadata.csv.",
                "dataType": _DTYPES[dtype],
                "source": {"fileObject": csv_ref, "extract": {"column": col}},
            }
        )
    return fields


def write_croissant(path: Path, doc: dict[str, Any]) -> None:
    """Write the JSON-LD deterministically (keys in the order built, UTF-8, 2-space indent)."""
    Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n")


def _quiet_mlcroissant() -> None:
    # mlcroissant logs through absl/root loggers; its warnings are collected as issues anyway.
    for name in ("absl", "mlcroissant"):
        logging.getLogger(name).setLevel(logging.ERROR)


def croissant_issues(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) from mlcroissant for the croissant.json at `path`."""
    import mlcroissant as mlc

    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such file"], []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{path}: not valid JSON ({e.__class__.__name__})"], []
    errors: list[str] = []
    if doc.get("conformsTo") != CONFORMS_TO:
        errors.append(f"conformsTo is {doc.get('conformsTo')!r}, expected {CONFORMS_TO!r}")
    _quiet_mlcroissant()
    try:
        ds = mlc.Dataset(jsonld=str(path))
    except mlc.ValidationError as e:
        listed = [line.strip()[1:].strip() for line in str(e).splitlines() if line.strip().startswith("-")]
        errors += listed or [str(e)]
        return errors, []
    except Exception as e:  # mlcroissant raises assorted types on malformed input; report them as findings
        return [*errors, f"mlcroissant could not read it: {e.__class__.__name__}: {e}"], []
    issues = ds.metadata.ctx.issues
    return errors + sorted(str(x) for x in issues.errors), sorted(str(x) for x in issues.warnings)


def validate_croissant(path: Path, *, strict: bool = False) -> list[str]:
    """Errors of the croissant.json at `path` (empty = valid); with `strict`, warnings count as errors."""
    errors, warnings = croissant_issues(path)
    return errors + (warnings if strict else [])


def croissant_records(path: Path, record_set: str = RECORD_SET) -> list[dict[str, Any]]:
    """All records of a record set, read offline from the bundle's own files (bytes decoded to str)."""
    import mlcroissant as mlc

    _quiet_mlcroissant()
    ds = mlc.Dataset(jsonld=str(path))
    out = []
    for rec in ds.records(record_set):
        out.append({k.split("/", 1)[-1]: (v.decode() if isinstance(v, bytes) else v) for k, v in rec.items()})
    return out
