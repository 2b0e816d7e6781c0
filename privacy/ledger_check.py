"""Independent check of a model's differential-privacy claim.

A DP-trained model directory holds `privacy_ledger.json` (written by `privacy.ledger`): the DP-SGD events
(noise multiplier, sampling rate, steps), δ, the accountant used and the ε it claims. Here ε is recomputed with
Google's `dp_accounting` (`privacy.ledger.epsilon_dp_accounting`: PLD for a PRV ledger, RDP at Opacus' orders for
an RDP ledger) and compared with the claim; a relative disagreement above `tolerance` (default 1%) is a blocking
finding. The ledger's own recorded cross-check is reported too, but never trusted: the recomputation is redone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privacy.ledger import PrivacyLedger, epsilon_dp_accounting
from synth import layout
from synth.errors import InputError, where

LEDGER_FILE = layout.PRIVACY_LEDGER


@dataclass(frozen=True)
class LedgerCheck:
    """Claimed vs independently recomputed ε."""

    path: str
    accountant: str
    delta: float
    steps: int
    events: int
    epsilon_claimed: float
    epsilon_recomputed: float
    method: str
    library: str
    relative_difference: float
    tolerance: float
    recorded_check: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.relative_difference <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def message(self) -> str:
        verdict = "agrees with" if self.passed else "DISAGREES with"
        return (
            f"recomputed ε = {self.epsilon_recomputed:.4f} ({self.library}, {self.method}) {verdict} the claimed "
            f"ε = {self.epsilon_claimed:.4f} at δ = {self.delta:g} (difference {self.relative_difference:.2%}, "
            f"tolerance {self.tolerance:.0%})"
        )


def _dp_accounting_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"dp-accounting {version('dp-accounting')}"
    except PackageNotFoundError:  # pragma: no cover - it is a dependency
        return "dp-accounting"


def relative_difference(claimed: float, recomputed: float) -> float:
    """|recomputed − claimed| / claimed (0 when both are 0, inf when only the claim is 0)."""
    if claimed == recomputed:
        return 0.0
    if claimed <= 0:
        return float("inf")
    return abs(recomputed - claimed) / claimed


def check_ledger(model_dir: Path, *, tolerance: float = 0.01) -> LedgerCheck | None:
    """Recompute the ε of `model_dir/privacy_ledger.json` with dp_accounting; None when the model has no ledger.

    Raises InputError when the ledger exists but cannot be read.
    """
    if not 0 <= tolerance < 1:
        raise InputError(f"ledger check: tolerance {tolerance!r} must be in [0, 1)")
    path = Path(model_dir) / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(where(path, f"cannot be read ({e.__class__.__name__})")) from None
    ledger = PrivacyLedger.from_json(text, source=path)
    method = "rdp" if ledger.accountant == "rdp" else "pld"
    recomputed = epsilon_dp_accounting(ledger, method)
    return LedgerCheck(
        path=str(path),
        accountant=ledger.accountant,
        delta=ledger.delta,
        steps=ledger.steps,
        events=len(ledger.events),
        epsilon_claimed=float(ledger.epsilon),
        epsilon_recomputed=float(recomputed),
        method=method,
        library=_dp_accounting_version(),
        relative_difference=relative_difference(float(ledger.epsilon), float(recomputed)),
        tolerance=tolerance,
        recorded_check=dict(ledger.epsilon_check),
    )
