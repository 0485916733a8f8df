"""The audit log: one JSON line per call, refused ones included.

    {"ts": "...", "rpc": "do_get", "outcome": "ok", "sub": "alice", "iss": "lclstream",
     "cert": "", "peer": "ipv4:10.0.0.7:51234", "experiment": "tmox42619", "run": 7,
     "bytes": 104857600}

Lines go to the `lclstream.audit` logger (stderr with the server's log) and, when configured, to
a file of their own for the facility's log shipping. Calls refused before they start (bad
credentials) carry no peer: pyarrow does not show it to middleware at that point.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

log = logging.getLogger("lclstream.audit")

_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (flight.FlightUnauthenticatedError, "unauthenticated"),
    (flight.FlightUnauthorizedError, "permission_denied"),
    (flight.FlightCancelledError, "cancelled"),
    (flight.FlightInternalError, "internal"),
    (pa.ArrowInvalid, "invalid_argument"),
    (pa.ArrowKeyError, "not_found"),
)


def outcome(exception: BaseException | None) -> str:
    if exception is None:
        return "ok"
    for cls, name in _OUTCOMES:
        if isinstance(exception, cls):
            return name
    return "error"


MAX_FIELD_CHARS = 256  # a name sent by a client is quoted this far: an audit line stays a line


def _message(exception: BaseException) -> str:
    return str(exception).split(". Detail:", 1)[0][:500]


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return f"{value[:MAX_FIELD_CHARS]}... ({len(value)} characters)"
    return value


class AuditLog:
    def __init__(self, path: Path | None = None, max_bytes: int = 64 * 1024 * 1024,
                 backups: int = 5) -> None:
        self.path = path
        self._handler: logging.Handler | None = None
        if path is not None:  # rotated by size: one line per call adds up
            self._handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(self._handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)

    def close(self) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def write(self, **fields: Any) -> None:
        fields = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                  **{k: _bounded(v) for k, v in fields.items()}}
        log.info(json.dumps(fields, separators=(",", ":")))

    def call(self, record: Any, exception: BaseException | None) -> None:
        identity = record.identity
        fields: dict[str, Any] = {
            "rpc": record.rpc, "outcome": outcome(exception),
            "sub": identity.subject, "iss": identity.issuer, "cert": record.certificate,
            "peer": record.peer, "experiment": record.experiment, "run": record.run,
            "bytes": record.bytes_sent,
        }
        if exception is not None:
            fields["error"] = _message(exception)
        self.write(**fields)

    def refused(self, rpc: str, exception: BaseException) -> None:
        self.write(rpc=rpc, outcome=outcome(exception), sub=None, iss=None, cert="", peer="",
                   experiment=None, run=None, bytes=0, error=_message(exception))
