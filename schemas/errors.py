"""The error contract between the server and its clients: which status each error stands for.

The server reports every error as a Flight status (README "Errors"). pyarrow loses the status on
one path: an error the server raises in GetSchema reaches the client as UNKNOWN, its message
naming the Python exception ("Python exception: <module>.<Class>: ..."). The classes the server
raises for statuses are therefore part of the contract, by class *name*: a client maps the name
back to the status, and the server may move its modules freely. The server's own tests check
that each class named here exists with the status it stands for.
"""

from __future__ import annotations

import re

# Class names the server raises (ours, and pyarrow's own Flight errors) -> the gRPC status.
ERROR_CLASSES: dict[str, str] = {
    "Unauthenticated": "UNAUTHENTICATED",
    "Forbidden": "PERMISSION_DENIED",
    "InvalidArgument": "INVALID_ARGUMENT",
    "NotFound": "NOT_FOUND",
    "RunUnreadable": "INTERNAL",
    "FlightUnauthenticatedError": "UNAUTHENTICATED",
    "FlightUnauthorizedError": "PERMISSION_DENIED",
    "FlightUnavailableError": "UNAVAILABLE",
    "FlightTimedOutError": "DEADLINE_EXCEEDED",
    "FlightCancelledError": "CANCELLED",
    "FlightInternalError": "INTERNAL",
}

_NAMED = re.compile(r"Python exception: (?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*)")


def status_named_in(message: str) -> str | None:
    """The status of the server exception a message names, or None when it names none we
    know."""
    found = _NAMED.search(message)
    return ERROR_CLASSES.get(found.group(1)) if found else None
