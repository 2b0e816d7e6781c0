"""Pydantic models of the catalog's JSON API (they make `/openapi.json` describe real shapes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ReleaseSummary(BaseModel):
    release_id: str
    created: str | None = Field(description="When the bundle was signed (ISO 8601, UTC).")
    title: str | None
    summary: str
    epsilon: float | None = Field(description="DP-SGD ε; null when the model was not trained with DP.")
    delta: float | None
    license: str | None = Field(description="From the dataset card's YAML header.")
    class_counts: dict[str, int] = Field(description="Images per class actually in the bundle.")
    images: int
    files: int
    bytes: int = Field(description="Total size of the data files (excluding manifest, provenance, signature).")
    fingerprint: str = Field(description="sha256 of the PEM public key (ECDSA) the bundle verified under; equals "
                                         "the key hint in release.sig.")
    approved_by: str = Field(description="The approval as signed in the bundle: 'reviewer NAME', 'automatic (no "
                                         "human review)' or 'not recorded'.")


class ReleaseList(BaseModel):
    releases: list[ReleaseSummary]


class KeyNumber(BaseModel):
    key: str | None
    label: str | None
    display: str | None
    status: str | None = Field(description="green / amber / red / none / not_judged, from the public audit report.")


class Audit(BaseModel):
    verdict: dict[str, Any]
    key_numbers: list[KeyNumber]


class ReleaseDetail(ReleaseSummary):
    accountant: str | None
    approval: dict[str, Any]
    audit: Audit
    dataset_card: str = Field(description="README.md (Hugging Face dataset card), as text.")
    datasheet: str
    terms: str = Field(description="Terms a researcher accepts before downloading.")
    terms_sha256: str
    verify_command: str


class AcceptRequest(BaseModel):
    """Optional: the sha256 of the terms text the researcher read (from `/api/releases/{id}`)."""

    terms_sha256: str | None = None


class Acceptance(BaseModel):
    release_id: str
    token: str = Field(description="The token's name.")
    terms_sha256: str
    accepted: str = Field(description="When the terms were first accepted with this token (ISO 8601, UTC).")
