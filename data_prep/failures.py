"""Failures of a unit of work: transient ones (retried by Ray), permanent ones (one-line errors), and the
fault injection the tests drive them with.

A hub read that times out, a connection reset or a server error (HTTP 429/5xx) may not happen again:
``build_unit`` raises ``TransientError`` and Ray runs the task again, up to ``RETRIES`` times (a lost
worker is retried by Ray the same way). Anything else about the data (a missing column, a bad file) is
permanent and reported as one line naming the unit.

Faults (tests only, unset = none): ``DATA_PREP_FAULTS`` holds ``name=value`` pairs separated by ``;``:

* ``fail_unit_once=I`` — the first attempt at unit ``I`` raises a ``TransientError`` (a marker file in
  the run's staging directory remembers the attempt across worker processes);
* ``kill_after_units=N`` — the driver kills itself (SIGKILL) once ``N`` units are finished.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

RETRIES = 3  # Ray's max_retries for a unit's task
FAULTS_ENV = "DATA_PREP_FAULTS"
_FAULTS = ("fail_unit_once", "kill_after_units")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class TransientError(Exception):
    """A failure that may not happen again; Ray retries the task that raised it."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a timeout, a lost connection or an HTTP
    status worth retrying. Checked by name for the HTTP clients, which data_prep does not import."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectionError, TransientError)):
            return True
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {
            "Timeout",
            "TimeoutException",
            "ConnectTimeout",
            "ReadTimeout",
            "ConnectError",
            "RemoteProtocolError",
            "ChunkedEncodingError",
            "ServerDisconnectedError",
        }:
            return True
        response = getattr(exc, "response", None)
        if getattr(response, "status_code", None) in _TRANSIENT_STATUS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fault(name: str) -> str | None:
    """The value of fault ``name`` in ``$DATA_PREP_FAULTS``, or None."""
    for part in filter(None, (p.strip() for p in os.environ.get(FAULTS_ENV, "").split(";"))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in _FAULTS:
            raise ValueError(f"{FAULTS_ENV}: {part!r} is not one of {', '.join(k + '=...' for k in _FAULTS)}")
        if key.strip() == name:
            return value.strip()
    return None


def inject_unit_fault(unit: int, staging: str | Path) -> None:
    """Raise a ``TransientError`` on the first attempt at ``unit`` if ``fail_unit_once`` names it."""
    target = fault("fail_unit_once")
    if target is None or int(target) != unit:
        return
    from sparsebert.storage import parse

    marker = parse(staging, "the staging directory") / f"fault-unit-{unit}"  # local, or in an object store
    if not marker.exists():
        marker.write_text("")
        raise TransientError(f"injected transient failure of unit {unit}")


def inject_driver_kill(finished: int) -> None:
    """SIGKILL the driver once ``finished`` units are done if ``kill_after_units`` asks for it."""
    target = fault("kill_after_units")
    if target is not None and finished >= int(target):
        os.kill(os.getpid(), signal.SIGKILL)
