"""Typed errors that reach clients with the right Flight status.

pyarrow turns an exception raised in a server method into a gRPC status from the exception's
class: ArrowInvalid -> INVALID_ARGUMENT, ArrowKeyError -> NOT_FOUND; the Flight error classes map
to UNAUTHENTICATED, PERMISSION_DENIED, INTERNAL and so on. Every error a client can cause is one of
these, with a message that says what was wrong and what would be valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.flight as flight


class InvalidArgument(pa.ArrowInvalid):
    """The request cannot be served as written (INVALID_ARGUMENT)."""


class NotFound(pa.ArrowKeyError):
    """An experiment, run or column that does not exist (NOT_FOUND)."""

    def __str__(self) -> str:
        # KeyError quotes its message; a person should read it as a sentence.
        return str(self.args[0]) if self.args else ""


class Unsupported(pa.ArrowNotImplementedError):
    """Something this server cannot do as installed, e.g. read xtc2 without psana
    (UNIMPLEMENTED)."""


class RunUnreadable(flight.FlightInternalError):
    """A run file that exists but cannot be read (truncated, corrupted, unknown layout)."""


def close_matches(name: str, candidates: Iterable[str], limit: int = 3) -> str:
    """A ' Did you mean ...?' hint, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def listing(names: Iterable[object], limit: int = 20) -> str:
    """A short, readable list of valid choices for an error message."""
    items = [str(n) for n in names]
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
