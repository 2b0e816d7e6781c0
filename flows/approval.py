"""The steward's decision: a Prefect pause with a typed form, or an explicit, recorded auto-approval."""

from __future__ import annotations

import json
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


# The numbers a steward decides on, in the order shown: utility (balanced-accuracy ratio, worst class), privacy
# (membership inference, memorized copies, ε). Keys of the report's summary.json `key_numbers`.
APPROVAL_NUMBERS = ("tstr_trtr_balanced_accuracy_ratio", "tstr_worst_class_sensitivity",
                    "tstr_trtr_worst_class_ratio", "membership_auc", "flagged_fraction", "epsilon")


def approval_numbers(report: Path) -> list[tuple[str, str]]:
    """(label, shown value) of the key numbers in the steward's report `summary.json` (numbers only, no pixels);
    a number the report does not have is left out."""
    try:
        numbers = json.loads((report / "summary.json").read_text(encoding="utf-8")).get("key_numbers", [])
    except (OSError, ValueError, AttributeError):
        return []
    by_key = {n.get("key"): n for n in numbers if isinstance(n, dict)}
    return [(str(by_key[k].get("label", k)), str(by_key[k].get("display", ""))) for k in APPROVAL_NUMBERS
            if k in by_key]


def approve_commands(flow_run_id: str) -> str:
    """The shell commands that answer a paused release flow."""
    return (f'synthgate approve {flow_run_id} --reviewer "Your Name" --comment "why"\n'
            f'synthgate approve {flow_run_id} --reviewer "Your Name" --reject --comment "why not"')


def approval_request(report: Path, summary: str, flow_run_id: str = "<flow-run-id>") -> str:
    """The markdown shown beside the approval form: key numbers, the report, and how to answer from a shell."""
    numbers = approval_numbers(report)
    table = ("| key number | value |\n|---|---|\n" + "\n".join(f"| {label} | {shown} |" for label, shown in numbers)
             + "\n\n") if numbers else ""
    return (
        "## Approve this synthetic release?\n\n"
        f"{table}"
        f"Read the steward's audit report first: `{report.resolve() / 'report.html'}` "
        "(it shows real patient images: it stays on this site).\n\n"
        "Answer with the form here, or from a shell:\n\n"
        f"```\n{approve_commands(flow_run_id)}\n```\n\n"
        "Approving signs the bundle and publishes it to the releases directory.\n\n"
        f"{summary}"
    )


def approval_prompt(report: Path, flow_run_id: str) -> str:
    """The plain-text lines printed in the terminal (and the flow's log) while the flow waits for a steward."""
    numbers = approval_numbers(report)
    width = max((len(label) for label, _ in numbers), default=0)
    return "\n".join([
        "waiting for a steward's approval; key numbers:",
        *(f"  {label:<{width}}  {shown}" for label, shown in numbers),
        f"read the steward's report: {report.resolve() / 'report.html'}",
        "then answer in the Prefect UI, or from another shell:",
        *(f"  {line}" for line in approve_commands(flow_run_id).splitlines()),
    ])


def request_approval(report: Path, summary: str, *, timeout_s: int) -> ApprovalFacts:
    """Pause the running flow until a steward approves or rejects (Prefect UI, or `synthgate approve`)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run

    run_id = str(flow_run.id)
    description = approval_request(report, summary, run_id)
    create_markdown_artifact(key="approval-request", markdown=description,
                             description="what the steward decides on, and how to answer")
    get_run_logger().info(approval_prompt(report, run_id))
    answer = pause_flow_run(
        wait_for_input=ApprovalInput.with_initial_data(description=description, approve=False, reviewer="",
                                                       comment=""),
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
