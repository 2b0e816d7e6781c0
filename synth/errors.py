"""One error hierarchy for synthgate.

Every error a user can cause is a `SynthgateError` (a `ValueError`), so the CLI can print one line and exit with
the right code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SynthgateError(ValueError):
    """Base of all user-facing errors. `exit_code` is what the CLI returns."""

    exit_code = 2


class InputError(SynthgateError):
    """A file, argument or configuration the user gave is missing, malformed or inconsistent."""

    exit_code = 2


class ConfigError(InputError):
    """A configuration value is out of range or inconsistent."""


class ValidationFailed(SynthgateError):
    """A dataset was read fine but breaks a blocking validation rule."""

    exit_code = 1


class PolicyBlocked(SynthgateError):
    """A release gate blocked the release."""

    exit_code = 1


class IntegrityError(SynthgateError):
    """An artifact or bundle does not match its recorded hashes or signature."""

    exit_code = 1


def where(path: object, problem: str) -> str:
    """Format the one-line message convention: '<file>: <problem>'."""
    return f"{path}: {problem}"
