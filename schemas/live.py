"""Live streams: the subscription request, and the metadata producers and consumers exchange.

A producer DoPuts batches to the path descriptor `[experiment, "live", stream]`, each with
`ProducerMeta` as its app_metadata; the server answers each batch, once it is durable, with an
`Ack`. A consumer asks for a `Subscription` (a JSON command, or the ticket GetFlightInfo returns)
and receives every batch with `Delivery` as its app_metadata: the stream offsets it covers.

Offsets count events: a batch of n events appended at offset o covers [o, o + n), and once the
stream ends as a run, offset o is event o of the run.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

from schemas.request import RequestError, load_document

LIVE_SEGMENT = "live"  # the middle element of a stream's path descriptor
EARLIEST, LATEST = "earliest", "latest"


@dataclass(frozen=True)
class Subscription:
    experiment: str
    stream: str
    start: str | int = EARLIEST  # "earliest" | "latest" | an offset | an ISO 8601 time
    group: str | None = None
    member: str | None = None
    columns: tuple[str, ...] | None = None
    filter: str | None = None
    processing: tuple[dict[str, Any], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": 1, "experiment": self.experiment, "stream": self.stream,
                               "from": self.start}
        for key in ("group", "member", "filter"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.columns is not None:
            doc["columns"] = list(self.columns)
        if self.processing is not None:
            doc["processing"] = list(self.processing)
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    def start_time_ns(self) -> int | None:
        """The `from` time in Unix nanoseconds, when `from` is a time."""
        if not isinstance(self.start, str) or self.start in (EARLIEST, LATEST):
            return None
        return parse_time_ns(self.start)


def parse_time_ns(text: str) -> int:
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RequestError(f"'from' must be 'earliest', 'latest', an offset or an ISO 8601 "
                           f"time such as 2026-11-24T09:30:00Z; got {text!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)  # facility clocks are UTC
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


def is_subscription(raw: bytes) -> bool:
    """Whether a JSON command or ticket is a live subscription (it names a stream)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and "stream" in doc


def parse_subscription(raw: bytes | str) -> Subscription:
    doc = load_document(raw, "live subscription", "live.schema.json")
    sub = Subscription(
        experiment=doc["experiment"], stream=doc["stream"], start=doc.get("from", EARLIEST),
        group=doc.get("group"), member=doc.get("member"),
        columns=None if doc.get("columns") is None else tuple(doc["columns"]),
        filter=doc.get("filter"),
        processing=None if doc.get("processing") is None else tuple(doc["processing"]),
    )
    sub.start_time_ns()  # a malformed time fails here, not at DoGet
    if sub.group is not None and sub.member is None:
        raise RequestError("a group subscription needs a 'member': any string unique to the "
                           "member (the client library makes one)")
    return sub


def decode_object(raw: bytes | None, what: str) -> dict[str, Any]:
    """A JSON object (empty input: {}); anything else is a RequestError naming `what`."""
    try:
        doc = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError(f"{what} must be a JSON object")
    return doc


@dataclass(frozen=True)
class ProducerMeta:
    """Sent with every batch. `producer` and `seq` make resends idempotent: a batch whose seq is
    not above the last one stored for its producer is a duplicate, acknowledged and not stored.
    `retention` (optional) sets the stream's retention: {"bytes": int, "seconds": float}."""

    producer: str | None = None
    seq: int | None = None
    retention: dict[str, float] | None = None

    def encode(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> ProducerMeta:
        doc = decode_object(raw, "producer metadata")
        unknown = set(doc) - {"producer", "seq", "retention"}
        if unknown:
            raise RequestError(f"unknown producer metadata {sorted(unknown)}; known: producer, "
                               "seq, retention")
        producer, seq, retention = doc.get("producer"), doc.get("seq"), doc.get("retention")
        if (producer is None) != (seq is None):
            raise RequestError("producer metadata needs both 'producer' and 'seq', or neither")
        if producer is not None and not (isinstance(producer, str) and 0 < len(producer) <= 128):
            raise RequestError("'producer' must be a string of 1 to 128 characters")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
            raise RequestError(f"'seq' must be an integer >= 0, got {seq!r}")
        if retention is not None:
            if not isinstance(retention, dict) or set(retention) - {"bytes", "seconds"} or any(
                    not isinstance(v, int | float) or isinstance(v, bool) or v <= 0
                    for v in retention.values()):
                raise RequestError("'retention' must be {\"bytes\": N, \"seconds\": S} with "
                                   "positive numbers")
        return cls(producer, seq, retention)


@dataclass(frozen=True)
class Ack:
    """A batch is durable: stored at [offset, offset + events); `duplicate` if it was a resend."""

    seq: int | None
    offset: int
    events: int
    duplicate: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Ack:
        doc = decode_object(raw, "ack")
        return cls(doc.get("seq"), doc["offset"], doc["events"], doc.get("duplicate", False))


GOING_AWAY = b'{"going_away":true}'  # sent instead of an ack: the server is stopping; finish
# the DoPut (what was not acknowledged is resent after reconnecting)


def is_going_away(raw: bytes) -> bool:
    return raw == GOING_AWAY


@dataclass(frozen=True)
class Delivery:
    """A consumer's batch covers stream offsets [offset, next); after a filter it may hold
    fewer events. Resume, or commit, with `next`."""

    offset: int
    next: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Delivery:
        doc = decode_object(raw, "delivery metadata")
        return cls(doc["offset"], doc["next"])
