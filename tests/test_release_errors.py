"""User errors inside the release flow: not retried, and printed without tracebacks."""

from __future__ import annotations

import logging
import sys

from prefect.states import Failed

from flows.cli_flow import _UserErrorsOnOneLine
from flows.release import _retry_unless_user_error
from synth.errors import InputError


def test_user_errors_are_not_retried_but_other_failures_are():
    assert _retry_unless_user_error(None, None, Failed(data=InputError("a.png: corrupt"))) is False
    assert _retry_unless_user_error(None, None, Failed(data=ConnectionError("worker lost"))) is True


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())


def test_console_drops_tracebacks_of_user_errors_only():
    user, bug = _record(InputError("a.png: corrupt")), _record(RuntimeError("a bug"))
    assert _UserErrorsOnOneLine().filter(user) and user.exc_info is None
    assert _UserErrorsOnOneLine().filter(bug) and bug.exc_info is not None
