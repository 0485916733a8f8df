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

from schemas.json_input import RequestError, excerpt, loads, loads_object
from schemas.request import add_compression, load_document

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
    compression: str | None = None  # on the wire: "zstd" | "lz4" | "none" (None: server's)
    compression_level: int | None = None

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
        add_compression(doc, self.compression, self.compression_level)
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
                           f"time such as 2026-11-24T09:30:00Z; got {excerpt(text)}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)  # facility clocks are UTC
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


def is_subscription(raw: bytes) -> bool:
    """Whether a JSON command or ticket is a live subscription (it names a stream)."""
    try:
        doc = loads(raw, "command")
    except RequestError:
        return False  # not one of ours: the request parser says what is wrong with it
    return isinstance(doc, dict) and "stream" in doc


def parse_subscription(raw: bytes | str) -> Subscription:
    doc = load_document(raw, "live subscription", "live.schema.json")
    sub = Subscription(
        experiment=doc["experiment"], stream=doc["stream"], start=doc.get("from", EARLIEST),
        group=doc.get("group"), member=doc.get("member"),
        columns=None if doc.get("columns") is None else tuple(doc["columns"]),
        filter=doc.get("filter"),
        processing=None if doc.get("processing") is None else tuple(doc["processing"]),
        compression=doc.get("compression"), compression_level=doc.get("compression_level"),
    )
    sub.start_time_ns()  # a malformed time fails here, not at DoGet
    if sub.group is not None and sub.member is None:
        raise RequestError("a group subscription needs a 'member': any string unique to the "
                           "member (the client library makes one)")
    return sub


def decode_object(raw: bytes | None, what: str) -> dict[str, Any]:
    """A JSON object (empty input: {}); anything else is a RequestError naming `what`."""
    return loads_object(raw, what, empty_is_object=True)


MAX_RETENTION_BYTES = 2**60
MAX_RETENTION_SECONDS = 100 * 365.25 * 86400  # a century: longer is a mistake, not a policy
MAX_SEQ = 2**63 - 1


def check_retention(retention: object) -> dict[str, float]:
    """A retention {"bytes": N, "seconds": S}: positive, finite and in range, or RequestError.
    Checked where it arrives and again where it is loaded from disk, since a stream's state
    written by an older server may hold what is refused today."""
    limits = {"bytes": MAX_RETENTION_BYTES, "seconds": MAX_RETENTION_SECONDS}
    if not isinstance(retention, dict) or set(retention) - set(limits) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= limits[k]
            for k, v in retention.items()):
        raise RequestError(
            "'retention' must be {\"bytes\": N, \"seconds\": S}: N a whole number of bytes "
            f"from 1 to {MAX_RETENTION_BYTES}, S seconds above 0 and at most "
            f"{MAX_RETENTION_SECONDS:.0f} (either may be left out)")
    if "bytes" in retention and not isinstance(retention["bytes"], int):
        raise RequestError("'retention' bytes must be a whole number")
    return retention


@dataclass(frozen=True)
class ProducerMeta:
    """Sent with every batch. `producer` and `seq` make resends idempotent: a batch whose seq is
    not above the last one stored for its producer is a duplicate, acknowledged and not stored.
    `retention` (optional) sets the stream's retention: {"bytes": int, "seconds": float}.
    `dropped` (optional): how many messages the producer has had to drop before sending so far
    (a bridge whose bounded queue overflowed), reported in the stream's listing."""

    producer: str | None = None
    seq: int | None = None
    retention: dict[str, float] | None = None
    dropped: int | None = None

    def encode(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> ProducerMeta:
        doc = decode_object(raw, "producer metadata")
        unknown = set(doc) - {"producer", "seq", "retention", "dropped"}
        if unknown:
            raise RequestError(f"unknown producer metadata {sorted(unknown)}; known: producer, "
                               "seq, retention, dropped")
        producer, seq, retention = doc.get("producer"), doc.get("seq"), doc.get("retention")
        dropped = doc.get("dropped")
        if dropped is not None and (not isinstance(dropped, int) or isinstance(dropped, bool)
                                    or not 0 <= dropped <= MAX_SEQ):
            raise RequestError(f"'dropped' must be an integer from 0 to {MAX_SEQ}, got "
                               f"{excerpt(dropped)}")
        if (producer is None) != (seq is None):
            raise RequestError("producer metadata needs both 'producer' and 'seq', or neither")
        if producer is not None and not (isinstance(producer, str) and 0 < len(producer) <= 128):
            raise RequestError("'producer' must be a string of 1 to 128 characters")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)
                                or not 0 <= seq <= MAX_SEQ):
            raise RequestError(f"'seq' must be an integer from 0 to {MAX_SEQ}, got {excerpt(seq)}")
        if retention is not None:
            retention = check_retention(retention)
        return cls(producer, seq, retention, dropped)


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


OWNER_SAYS = "is served by its owner, the node at "


def owner_message(experiment: str, stream: str, location: str) -> str:
    """A cluster node's answer for a live stream another node owns (UNAVAILABLE): clients
    connect to `location` and ask again."""
    return f"live stream {experiment}/{stream} {OWNER_SAYS}{location} ; connect there"


def owner_named_in(error: BaseException) -> str | None:
    """The owner's location, if `error` is a cluster node's redirect."""
    text = str(error)
    at = text.find(OWNER_SAYS)
    if at < 0:
        return None
    location = text[at + len(OWNER_SAYS):].split(" ", 1)[0]
    return location if location.startswith("grpc") else None


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
