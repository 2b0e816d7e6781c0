"""The Great Expectations suite for a canonical dataset's metadata, and its Data Docs.

One ephemeral GX context per run, one pandas datasource, one suite. Every expectation carries the synthgate
rule it checks and that rule's severity in its `meta`, so a failed expectation maps straight onto a finding.

Privacy: GX's default result format copies sample failing values into the results and from there into Data
Docs. Every run here uses `RESULT_FORMAT`, which keeps counts and drops values; `tests/test_validate.py`
plants PHI and checks that none of it reaches the report or the docs.

great_expectations is imported inside the functions: it costs ~2.4 s, and importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from synth.data.canonical import REQUIRED_COLUMNS, SPLIT_ORDER

# Counts only: no sample of unexpected values, no index lists.
RESULT_FORMAT: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 0}

SUITE_NAME = "synthgate-metadata"
ALLOWED_SPLITS: tuple[str, ...] = tuple(SPLIT_ORDER)  # train, val, test, synthetic
STRING_COLUMNS = ("image_id", "split", "sha256", "patient_id")
INTEGER_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
SHA256_REGEX = r"^[0-9a-f]{64}$"
_DOCS_SITE = "synthgate"

# Rule ids (stable: the CLI, reports and gates key on them).
COLUMNS = "metadata.columns"
TYPES = "metadata.types"
NOT_NULL = "metadata.not_null"
LABEL_RANGE = "metadata.label_range"
SPLIT_VALUES = "metadata.split_values"
IMAGE_ID_UNIQUE = "metadata.image_id_unique"
SHA256_FORMAT = "metadata.sha256_format"
CLASS_COUNT = "class_counts.min"


@dataclass(frozen=True)
class ExpectationResult:
    """One GX expectation's outcome, stripped to counts: never a data value.

    `observed` is a row count (class-count checks) or a dtype name (type checks); `condition` names the split
    and class a class-count check was restricted to.
    """

    type: str
    column: str | None
    success: bool
    rule: str
    severity: str  # "block" | "warn"
    unexpected_count: int | None = None
    observed: int | str | None = None
    condition: dict[str, str] | None = None
    raised: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpectationResult:
        return cls(**data)


def _is_string_like(series: pd.Series) -> bool:
    return isinstance(series.dtype, pd.StringDtype) or series.dtype == object


def _gx_frame(metadata: pd.DataFrame) -> pd.DataFrame:
    """The frame GX sees: pandas 3 `str` columns as object.

    GX 1.24's type-list check does not recognise pandas 3's `StringDtype`; on object columns it checks each
    value's Python type instead, which is the stricter test anyway.
    """
    frame = metadata.copy()
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.StringDtype):
            frame[column] = frame[column].astype(object)
    return frame


def build_expectations(
    metadata: pd.DataFrame, *, class_names: Sequence[str], min_per_class: int
) -> list[Any]:
    """The suite's expectations for this metadata frame.

    Value checks are only added for columns that exist and have a type the check can evaluate; a missing or
    mistyped column is reported once, by its existence or type expectation, instead of as a cascade of errors.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def meta(rule: str, severity: str = "block", **extra: str) -> dict[str, Any]:
        return {"rule": rule, "severity": severity, **extra}

    def gx_severity(severity: str) -> str:
        return "critical" if severity == "block" else "warning"

    present = set(metadata.columns)
    exps: list[Any] = [gxe.ExpectColumnToExist(column=c, meta=meta(COLUMNS)) for c in REQUIRED_COLUMNS]

    for column in STRING_COLUMNS:
        if column in present:
            exps.append(
                gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=["str"], meta=meta(TYPES))
            )
    if "label" in present:
        exps.append(
            gxe.ExpectColumnValuesToBeInTypeList(column="label", type_list=INTEGER_TYPES, meta=meta(TYPES))
        )

    for column in REQUIRED_COLUMNS:
        if column in present:
            exps.append(gxe.ExpectColumnValuesToNotBeNull(column=column, meta=meta(NOT_NULL)))
    if "patient_id" in present:
        # A row without a patient id escapes the patient-leakage check; worth a warning, not a block.
        exps.append(
            gxe.ExpectColumnValuesToNotBeNull(
                column="patient_id", meta=meta(NOT_NULL, "warn"), severity=gx_severity("warn")
            )
        )

    label_ok = "label" in present and pd.api.types.is_integer_dtype(metadata["label"].dtype)
    if label_ok:
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="label", min_value=0, max_value=len(class_names) - 1, meta=meta(LABEL_RANGE)
            )
        )
    if "split" in present:
        exps.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="split", value_set=list(ALLOWED_SPLITS), meta=meta(SPLIT_VALUES)
            )
        )
    if "image_id" in present:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="image_id", meta=meta(IMAGE_ID_UNIQUE)))
    if "sha256" in present and _is_string_like(metadata["sha256"]):
        exps.append(
            gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_REGEX, meta=meta(SHA256_FORMAT))
        )

    if label_ok and "split" in present:
        splits = [s for s in ALLOWED_SPLITS if (metadata["split"] == s).any()]
        for split in splits:
            # The training split must teach every class; a thin holdout only weakens the audit.
            severity = "block" if split == "train" else "warn"
            for index, name in enumerate(class_names):
                exps.append(
                    gxe.ExpectTableRowCountToBeBetween(
                        min_value=min_per_class,
                        row_condition=(Column("split") == split) & (Column("label") == index),
                        meta=meta(CLASS_COUNT, severity, split=split, **{"class": str(name)}),
                        severity=gx_severity(severity),
                    )
                )
    return exps


def _to_result(res: Any) -> ExpectationResult:
    config = res.expectation_config
    meta = dict(config.meta or {})
    kwargs = config.kwargs
    result = res.result or {}
    raised = bool((res.exception_info or {}).get("raised_exception", False))
    if not raised and isinstance(res.exception_info, dict):
        # Metric-level failures come back keyed by metric id.
        raised = any(isinstance(v, dict) and v.get("raised_exception") for v in res.exception_info.values())
    unexpected = result.get("unexpected_count")
    observed = result.get("observed_value")
    if not isinstance(observed, int | str) or isinstance(observed, bool):
        observed = None
    if config.type != "expect_table_row_count_to_be_between" and isinstance(observed, int):
        observed = None  # only row counts and dtype names are kept
    condition = {k: str(meta[k]) for k in ("split", "class") if k in meta} or None
    return ExpectationResult(
        type=config.type,
        column=kwargs.get("column"),
        success=bool(res.success) and not raised,
        rule=str(meta.get("rule", "metadata")),
        severity=str(meta.get("severity", "block")),
        unexpected_count=None if unexpected is None else int(unexpected),
        observed=observed,
        condition=condition,
        raised=raised,
    )


def run_metadata_suite(
    metadata: pd.DataFrame,
    *,
    class_names: Sequence[str],
    min_per_class: int,
    docs_dir: Path | None = None,
) -> list[ExpectationResult]:
    """Validate `metadata` with one GX suite; with `docs_dir`, build the Data Docs site there.

    Runs in an ephemeral context (nothing is written outside `docs_dir`) with progress bars off and
    `RESULT_FORMAT`, so neither the results nor the docs hold a data value.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name=_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),  # GX requires an absolute path
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    batch = (
        context.data_sources.add_pandas("synthgate")
        .add_dataframe_asset("metadata")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for expectation in build_expectations(metadata, class_names=class_names, min_per_class=min_per_class):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="synthgate-validate", data=batch, suite=suite)
    )
    outcome = definition.run(batch_parameters={"dataframe": _gx_frame(metadata)}, result_format=RESULT_FORMAT)
    if docs_dir is not None:
        context.build_data_docs(site_names=[_DOCS_SITE])
    return [_to_result(r) for r in outcome.results]
