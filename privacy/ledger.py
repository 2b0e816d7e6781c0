"""The privacy ledger: an immutable record of every DP-SGD step, from which ε can be recomputed by anyone.

Events follow the spirit of Google's dp_accounting DpEvents: a `DPSGDEvent` is `steps` compositions of a
Poisson-subsampled Gaussian mechanism with noise multiplier σ and sampling rate q. The ledger adds what a reader
needs to judge the claim (δ, accountant, clipping norm, dataset size, how q was set, whether the noise RNG was
cryptographically secure). `epsilon_from_ledger` recomputes ε with Opacus' accountants; `epsilon_dp_accounting`
recomputes it independently with dp_accounting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from synth.errors import InputError, where

SCHEMA_VERSION = 1
ACCOUNTANTS = ("prv", "rdp")
SECURE_RNG_REASON = "torchcsprng unavailable for current torch (Opacus secure_mode needs it)"
# Opacus' make_private sets q = 1/len(data_loader) and its DPDataLoader samples at that same rate, so the
# accounting matches the sampler actually used; the nominal batch/N differs by ~1% (recorded for the reader).
SAMPLE_RATE_SOURCE = "1/len(loader)"
PRIVACY_UNIT = "training example (one image); the K noise draws of an example are folded into one clipped gradient"


@dataclass(frozen=True, kw_only=True)
class DPSGDEvent:
    """`steps` DP-SGD steps with noise multiplier σ (noise std / clipping norm) and Poisson sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise InputError(f"DPSGDEvent: noise_multiplier {self.noise_multiplier!r} must be > 0")
        if not 0 < self.sample_rate <= 1:
            raise InputError(f"DPSGDEvent: sample_rate {self.sample_rate!r} must be in (0, 1]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"DPSGDEvent: steps {self.steps!r} must be a positive integer")


def events_from_history(history: Iterable[tuple[float, float, int]]) -> tuple[DPSGDEvent, ...]:
    """Events from an Opacus accountant's `history` of (noise_multiplier, sample_rate, steps) tuples."""
    return tuple(DPSGDEvent(noise_multiplier=float(s), sample_rate=float(q), steps=int(n)) for s, q, n in history)


def history_from_events(events: Iterable[DPSGDEvent]) -> list[tuple[float, float, int]]:
    """The inverse of `events_from_history`: an Opacus accountant `history` list."""
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]


@dataclass(frozen=True, kw_only=True)
class PrivacyLedger:
    """What was spent, how it was computed, and what a reader needs to recompute or question it."""

    events: tuple[DPSGDEvent, ...]
    delta: float
    accountant: str
    epsilon: float
    target_epsilon: float | None = None
    max_grad_norm: float
    noise_multiplicity: int
    dataset_size: int
    batch_size: int | None = None  # the logical loader batch size the sample rate came from
    sample_rate_source: str = SAMPLE_RATE_SOURCE
    poisson_sampling: bool = True
    grad_sample_mode: str | None = None
    secure_rng: bool = False
    secure_rng_reason: str = SECURE_RNG_REASON
    privacy_unit: str = PRIVACY_UNIT
    opacus_version: str = ""
    # An independent recomputation of ε (dp_accounting), recorded when the ledger was made.
    epsilon_check: Mapping[str, Any] = field(default_factory=dict)
    # How the settings were chosen (`privacy.dp_plan`, `dp.plan: auto`): inputs, chosen values, reasons, overrides.
    dp_plan: Mapping[str, Any] | None = None
    # The public model the run started from (`train.init_from`): its content hash and its data's declared licence
    # and source. The guarantee above covers the private training set only, not that public data.
    public_pretraining: Mapping[str, Any] | None = None
    # A latent generator's autoencoder: trained with DP on the private images ("dp": its share of the target, its
    # own events, which are also in `events` and composed into `epsilon`) or reused from a public model ("public":
    # its content hash, licence and source; not covered by the guarantee). None for a pixel generator.
    autoencoder: Mapping[str, Any] | None = None
    # The planned steps fitted to the time cap before σ was calibrated (`synth.step_fit`): requested and fitted
    # steps, the probe's measured seconds per step. None: the configured steps were used as given.
    step_fit: Mapping[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise InputError(f"privacy ledger: accountant {self.accountant!r} is not one of {ACCOUNTANTS}")
        if not 0 < self.delta < 1:
            raise InputError(f"privacy ledger: delta {self.delta!r} must be in (0, 1)")
        if self.schema_version != SCHEMA_VERSION:
            raise InputError(f"privacy ledger: schema_version {self.schema_version!r} unsupported")
        object.__setattr__(self, "events", tuple(self.events))

    @property
    def steps(self) -> int:
        """Total DP-SGD steps recorded."""
        return sum(e.steps for e in self.events)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of `privacy_ledger.json`)."""
        d = asdict(self)
        d["events"] = [{"type": "DPSGDEvent", **asdict(e)} for e in self.events]
        d["epsilon_check"] = dict(self.epsilon_check)
        d["steps"] = self.steps
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: object = "privacy ledger") -> PrivacyLedger:
        """Rebuild a ledger from `to_dict()` output; `source` names the file in error messages."""
        if not isinstance(d, Mapping):
            raise InputError(where(source, f"expected a JSON object, got {type(d).__name__}"))
        d = dict(d)
        d.pop("steps", None)  # derived
        try:
            raw_events = d.pop("events")
            events = []
            for e in raw_events:
                e = dict(e)
                if e.pop("type", "DPSGDEvent") != "DPSGDEvent":
                    raise InputError(f"unknown event type in {e!r}")
                events.append(DPSGDEvent(**e))
            return cls(events=tuple(events), **d)
        except InputError as err:
            raise InputError(where(source, str(err))) from None
        except (KeyError, TypeError) as err:
            raise InputError(where(source, f"malformed privacy ledger: {err}")) from None

    @classmethod
    def from_json(cls, text: str, *, source: object = "privacy ledger") -> PrivacyLedger:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(where(source, f"not valid JSON: {err}")) from None
        return cls.from_dict(d, source=source)


def _opacus_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise InputError(f"accountant {name!r} is not one of {ACCOUNTANTS}")


def epsilon_for_events(events: Iterable[DPSGDEvent], *, delta: float, accountant: str = "prv") -> float:
    """ε of composing `events` at `delta` with Opacus' PRV or RDP accountant (0.0 for no events)."""
    acc = _opacus_accountant(accountant)
    acc.history = history_from_events(events)
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta))


def epsilon_from_ledger(ledger: PrivacyLedger, accountant: str | None = None) -> float:
    """Recompute the ledger's ε with Opacus' accountant classes (default: the ledger's own accountant)."""
    return epsilon_for_events(ledger.events, delta=ledger.delta, accountant=accountant or ledger.accountant)


def epsilon_dp_accounting(
    ledger: PrivacyLedger, method: str | None = None, *, pld_discretization: float = 1e-3
) -> float:
    """Recompute ε independently with Google's dp_accounting.

    `method` "pld" (privacy loss distributions: tight, comparable with Opacus' PRV) or "rdp" (Rényi DP at Opacus'
    default orders, comparable with Opacus' RDP). Default: "rdp" for an RDP ledger, else "pld". Each event is
    `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` composed `steps` times.
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    method = method or ("rdp" if ledger.accountant == "rdp" else "pld")
    if not ledger.events:
        return 0.0
    if method == "rdp":
        from opacus.accountants import RDPAccountant

        acc = rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    elif method == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=pld_discretization)
    else:
        raise InputError(f"dp_accounting method {method!r} is not 'pld' or 'rdp'")
    for e in ledger.events:
        gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian), e.steps)
    return float(acc.get_epsilon(ledger.delta))


def build_ledger(
    history: Iterable[tuple[float, float, int]],
    *,
    delta: float,
    accountant: str,
    max_grad_norm: float,
    noise_multiplicity: int,
    dataset_size: int,
    target_epsilon: float | None = None,
    batch_size: int | None = None,
    grad_sample_mode: str | None = None,
    dp_plan: Mapping[str, Any] | None = None,
    autoencoder: Mapping[str, Any] | None = None,
    check: bool = True,
) -> PrivacyLedger:
    """A ledger from an Opacus accountant history: ε with `accountant`, plus (if `check`) dp_accounting's ε."""
    import dp_accounting
    import opacus

    events = events_from_history(history)
    base = PrivacyLedger(
        events=events,
        delta=delta,
        accountant=accountant,
        epsilon=epsilon_for_events(events, delta=delta, accountant=accountant),
        target_epsilon=target_epsilon,
        max_grad_norm=max_grad_norm,
        noise_multiplicity=noise_multiplicity,
        dataset_size=dataset_size,
        batch_size=batch_size,
        grad_sample_mode=grad_sample_mode,
        opacus_version=opacus.__version__,
        dp_plan=dp_plan,
        autoencoder=autoencoder,
    )
    if not check:
        return base
    method = "rdp" if accountant == "rdp" else "pld"
    version = getattr(dp_accounting, "__version__", None) or _dist_version("dp-accounting")
    check_d = {"library": f"dp-accounting {version}", "method": method, "epsilon": epsilon_dp_accounting(base)}
    return replace(base, epsilon_check=check_d)


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def load_ledger(path) -> PrivacyLedger:
    """Read a `privacy_ledger.json` (errors name the file)."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(where(path, f"cannot read privacy ledger: {err.strerror}")) from None
    except UnicodeDecodeError as err:
        raise InputError(where(path, f"cannot be read as JSON ({err.__class__.__name__})")) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(where(path, f"cannot be read as JSON ({err.__class__.__name__})")) from None
    return PrivacyLedger.from_dict(data, source=path)


def read_model_ledger(model_dir) -> PrivacyLedger | None:
    """The privacy ledger of a model directory (`privacy_ledger.json`), or None when the model was trained without
    DP. The one reader every consumer (ledger check, gate, report, release documents) goes through."""
    from pathlib import Path

    from synth.layout import PRIVACY_LEDGER

    path = Path(model_dir) / PRIVACY_LEDGER
    return load_ledger(path) if path.exists() else None
