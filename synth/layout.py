"""File names of the artifacts stages hand to each other, in one place.

Every module that writes or reads one of these names imports it from here, so a writer and its readers cannot
drift apart, and readers need not import the writer (that is what made `synth.model_dir` and `synth.pipeline`
import each other). Names private to one stage (checkpoint state, shard rows, encoder files) stay in that stage.
"""

from __future__ import annotations

# Canonical dataset (synth/data/canonical.py): the ingested real set and every generated set.
DATASET_HEADER = "dataset.json"
DATASET_METADATA = "metadata.parquet"
# Validation report of a real dataset (synth/data/validate.py).
VALIDATION_REPORT = "report.json"
# Model directory (synth/model_dir.py).
MODEL_CARD = "model_card.json"
MODEL_KIND = "model"
PRIVACY_LEDGER = "privacy_ledger.json"  # DP runs only (privacy/ledger.py)
EMA_DIR = "unet_ema"
# EMA weights kept during training (`train.snapshot_every`), one diffusers UNet folder per step.
SNAPSHOTS_DIR = "unet_ema_snapshots"


def snapshot_dir(step: int) -> str:
    """The model directory's folder of the EMA weights after `step` optimizer steps."""
    return f"{SNAPSHOTS_DIR}/step-{int(step):06d}"


# The standalone pipeline for plain diffusers (synth/diffusers_pipeline.py); diffusers' name for a local custom
# pipeline file (`custom_pipeline=<model dir>` looks for exactly this name).
PIPELINE_FILE = "pipeline.py"
# Privacy audit (privacy/audit.py).
PRIVACY_AUDIT_HEADER = "privacy.json"
PRIVACY_AUDIT_KIND = "privacy_audit"
MEMORIZATION_TABLE = "memorization.parquet"
# Utility audit (reports/utility.py).
UTILITY_HEADER = "utility.json"
UTILITY_KIND = "utility_audit"
UTILITY_ROC = "roc.json"
# Guidance-scale selection (reports/guidance.py).
GUIDANCE_HEADER = "guidance.json"
# The steward's / public report (reports/report.py).
REPORT_HTML = "report.html"
REPORT_SUMMARY = "summary.json"

# Every artifact header, in the order `flows` looks for one when it needs a directory's content hash.
ARTIFACT_HEADERS = (DATASET_HEADER, MODEL_CARD, PRIVACY_AUDIT_HEADER, UTILITY_HEADER, REPORT_SUMMARY,
                    VALIDATION_REPORT)
