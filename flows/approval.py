"""The steward's decision: a Prefect pause with a typed form, or an explicit, recorded auto-approval."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect.input import RunInput
from pydantic import Field

from reports.facts import ApprovalFacts


class ApprovalInput(RunInput):
    """What the steward fills in when the release flow pauses (shown as a form in the Prefect UI)."""

    approve: bool = Field(description="Approve this release for publication")
    reviewer: str = Field(description="Your name (recorded in the datasheet)")
    comment: str = Field("", description="Why, or what to watch for (recorded in the datasheet)")


def auto_approval() -> ApprovalFacts:
    """Scripted runs and tests: recorded in the datasheet as 'auto-approved, no human review'."""
    return ApprovalFacts(decision="approved", auto_approved=True, reviewer=None,
                         comment="auto-approved (--auto-approve): no human review", time=datetime.now(UTC))


def approval_request(report: Path, summary: str) -> str:
    """The markdown shown beside the approval form."""
    return (
        "## Approve this synthetic release?\n\n"
        f"{summary}\n\n"
        f"Read the steward's audit report first: `{report.resolve() / 'report.html'}` "
        "(it shows real patient images: it stays on this site).\n\n"
        "Approving signs the bundle and publishes it to the releases directory."
    )


def request_approval(report: Path, summary: str, *, timeout_s: int) -> ApprovalFacts:
    """Pause the running flow until a steward approves or rejects (Prefect UI, or `synthgate approve`)."""
    from prefect.flow_runs import pause_flow_run

    answer = pause_flow_run(
        wait_for_input=ApprovalInput.with_initial_data(
            description=approval_request(report, summary), approve=False, reviewer="", comment=""
        ),
        timeout=timeout_s,
        poll_interval=2,  # a steward's click should take effect in seconds
    )
    return ApprovalFacts(
        decision="approved" if answer.approve else "rejected",
        auto_approved=False,
        reviewer=answer.reviewer.strip() or "unnamed reviewer",
        comment=answer.comment,
        time=datetime.now(UTC),
    )
