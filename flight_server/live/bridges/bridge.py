"""A bridge: a facility stream (ZMQ, in its own format) turned into one of our live streams.

Three threads:
- the receiver owns the ZMQ socket and does nothing but receive into a bounded queue (messages
  and bytes). A sender is never slowed by us: when the server cannot keep up, the queue
  overflows, the newest messages are dropped and counted, and memory stays bounded;
- the main thread decodes (formats.py) and gathers rows into batches of `batch_events` or
  `batch_bytes` (or what arrived within `linger` seconds);
- the sender joins each batch's rows and sends them with a `Producer` while the next messages
  are decoded: acknowledged, resent after a server restart, de-duplicated by sequence number.
A message that is not the announced format is counted and skipped; a batch the stream refuses
(another schema) is counted and dropped, and the stream keeps what it had.
"""

from __future__ import annotations

import importlib
import logging
import queue as queue_module
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.errors import InvalidArgument
from flight_server.live import run_writer
from flight_server.live.bridges.formats import BadMessage, Decoded, Format

log = logging.getLogger(__name__)

# FORMAT (as `lclstream bridge FORMAT` names it) -> "module:class"; imported when chosen, so a
# bridge loads only its own format's libraries.
FORMATS = {
    "lclstreamer-hdf5": "flight_server.live.bridges.lclstreamer:LclstreamerHdf5",
    "simplon": "flight_server.live.bridges.dectris:Stream2",
    "dectris-stream2": "flight_server.live.bridges.dectris:Stream2",
    "karabo-bridge": "flight_server.live.bridges.karabo:KaraboBridge",
}
SOCKET_TYPES = ("PULL", "SUB", "REQ")
RENAMED_PREFIX = "sent/"  # a column whose name the run layout reserves (`timestamp` as a float)
POLL_MS = 100  # how often the receiver looks at the stop flag while nothing arrives


def make_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown bridge format {name!r}; known: {', '.join(FORMATS)}")
    module, _, cls = FORMATS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


@dataclass
class BridgeStats:
    """What a bridge did; `dropped` is also reported to the server with the stream."""

    received: int = 0  # messages taken off the socket
    received_bytes: int = 0
    dropped: int = 0  # messages the full queue could not take
    bad: int = 0  # messages that were not the announced format
    refused: int = 0  # events the stream would not take (another schema)
    events: int = 0  # events sent and acknowledged
    batches: int = 0
    last_error: str | None = None
    bad_reasons: dict[str, int] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # text columns a stream cannot store

    def summary(self, fmt: str) -> str:
        return (f"{self.received} messages received ({self.received_bytes / 1e6:.1f} MB), "
                f"{self.events} events sent in {self.batches} batches, {self.dropped} messages "
                f"dropped (queue full), {self.bad} not {fmt}, {self.refused} events refused by "
                "the stream"
                + (f"; text columns left out: {', '.join(self.left_out)}" if self.left_out else ""))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Queue:
    """Messages from the receiver to the decoder, bounded in count and in bytes."""

    max_messages: int = 1000
    max_bytes: int = 512 << 20
    _items: deque = field(default_factory=deque)
    _bytes: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def offer(self, parts: list, nbytes: int) -> bool:
        """Queue a message unless that would pass a bound (then False: the caller drops it)."""
        with self._cond:
            if self._items and (len(self._items) >= self.max_messages
                                or self._bytes + nbytes > self.max_bytes):
                return False
            self._items.append((parts, nbytes))
            self._bytes += nbytes
            self._cond.notify()
            return True

    def take(self, timeout: float) -> list | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            parts, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cond.notify()
            return parts

    def has_room(self) -> bool:
        with self._cond:
            return len(self._items) < self.max_messages and self._bytes < self.max_bytes

    def wait_for_room(self, timeout: float) -> bool:
        with self._cond:
            if len(self._items) >= self.max_messages or self._bytes >= self.max_bytes:
                self._cond.wait(timeout)
            return len(self._items) < self.max_messages and self._bytes < self.max_bytes

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class Bridge:
    """Run with `run()` until `stop()` (or `max_messages`); `stats` says what happened."""

    def __init__(self, fmt: Format, producer, endpoint: str, *, bind: bool = False,
                 socket_type: str | None = None, batch_events: int | None = None,
                 batch_bytes: int = 4 << 20, linger: float = 0.2,
                 queue: Queue | None = None, receive_hwm: int = 1000,
                 on_batch: Callable[[pa.RecordBatch], None] | None = None) -> None:
        self.format = fmt
        self.producer = producer
        self.endpoint, self.bind = endpoint, bind
        self.socket_type = (socket_type or fmt.socket_type).upper()
        if self.socket_type not in SOCKET_TYPES:
            raise ValueError(f"socket type must be one of {', '.join(SOCKET_TYPES)}")
        self.batch_events, self.batch_bytes, self.linger = batch_events, batch_bytes, linger
        self.queue = queue if queue is not None else Queue()  # (an empty Queue is falsy)
        self.receive_hwm = receive_hwm
        self.on_batch = on_batch
        self.stats = BridgeStats()
        self._stop = threading.Event()
        self._receiver_done = threading.Event()
        self._receiver_error: BaseException | None = None
        self._metadata: dict[str, str] = {}
        self._pending: list[pa.RecordBatch] = []
        self._pending_events = self._pending_bytes = 0
        self._last_arrival = time.monotonic()
        self._sent_schema: pa.Schema | None = None
        self._adapt: dict[pa.Schema, list] = {}  # per decoded schema: how each column is stored
        self._to_send: queue_module.Queue = queue_module.Queue(maxsize=2)
        self._sender_error: BaseException | None = None
        self.ready = threading.Event()  # the socket is connected or bound

    def stop(self) -> None:
        self._stop.set()

    # -- receiving (its own thread: it owns the socket) ---------------------------------------

    def _receive(self, max_messages: int | None) -> None:
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(getattr(zmq, self.socket_type))
        try:
            sock.setsockopt(zmq.RCVHWM, self.receive_hwm)
            sock.setsockopt(zmq.LINGER, 0)
            if self.socket_type == "SUB":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            if self.socket_type == "REQ":
                # A peer that goes away mid-request must not wedge the socket: resend on
                # reconnect, and accept a reply to the latest request only.
                sock.setsockopt(zmq.REQ_RELAXED, 1)
                sock.setsockopt(zmq.REQ_CORRELATE, 1)
            (sock.bind if self.bind else sock.connect)(self.endpoint)
            self.ready.set()
            asked = False
            while not self._stop.is_set():
                if max_messages is not None and self.stats.received >= max_messages:
                    break
                if self.socket_type == "REQ" and not asked:
                    # Ask only when the queue has room: a requested source is paced by us, so
                    # nothing needs dropping.
                    if not self.queue.wait_for_room(POLL_MS / 1000):
                        continue
                    sock.send(self.format.request() or b"next")
                    asked = True
                if not sock.poll(POLL_MS):
                    continue
                frames = sock.recv_multipart(copy=False)
                asked = False
                parts = [f.buffer for f in frames]
                nbytes = sum(len(p) for p in parts)
                self.stats.received += 1
                self.stats.received_bytes += nbytes
                if not self.queue.offer(parts, nbytes):
                    self.stats.dropped += 1
        except BaseException as exc:  # reported by run(); the bridge stops
            self._receiver_error = exc
            self.ready.set()
        finally:
            sock.close(0)
            self._receiver_done.set()

    # -- decoding and sending (the caller's thread) -------------------------------------------

    def run(self, max_messages: int | None = None) -> BridgeStats:
        receiver = threading.Thread(target=self._receive, args=(max_messages,), daemon=True,
                                    name="lclstream-bridge-receive")
        sender = threading.Thread(target=self._send_loop, daemon=True,
                                  name="lclstream-bridge-send")
        receiver.start()
        sender.start()
        try:
            while True:
                parts = self.queue.take(min(self.linger, POLL_MS / 1000))
                if parts is None:
                    if self._receiver_done.is_set() and not len(self.queue):
                        break
                    if self._pending and time.monotonic() - self._last_arrival >= self.linger:
                        self._flush()
                    continue
                self._last_arrival = time.monotonic()
                self._handle(parts)
            self._flush()
        finally:
            self._stop.set()
            self._to_send.put(None)
            sender.join()
            receiver.join()
        if self._sender_error is not None:
            raise self._sender_error
        self.producer.dropped = self.stats.dropped
        self.producer.flush()
        if self._receiver_error is not None:
            raise self._receiver_error
        return self.stats

    def _storable(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch as a live stream can store it (a stream ends as a run file: numbers only):
        booleans as uint8, a column whose name the run layout reserves for another type renamed
        `sent/<name>`, and text left out. What is changed is logged once per column."""
        key = batch.schema
        plan = self._adapt.get(key)
        if plan is None:
            plan = self._adapt[key] = [self._adapt_field(f) for f in batch.schema]
        if all(p is None for p in plan):
            return batch
        arrays, fields = [], []
        for column, stored, change in zip(batch.columns, batch.schema, plan, strict=True):
            if change is None:
                arrays.append(column)
                fields.append(stored)
            elif change != "leave out":
                arrays.append(column if change.type == stored.type else column.cast(change.type))
                fields.append(change)
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, batch.schema.metadata))

    def _adapt_field(self, column: pa.Field) -> pa.Field | str | None:
        """None: stored as it is; a field: stored as that; "leave out": not storable."""
        if _storable(column):
            return None
        t = column.type
        note = {b"lclstream.bridge": b""}
        if pa.types.is_boolean(t) or (pa.types.is_list(t) and pa.types.is_boolean(t.value_type)):
            target = column.with_type(pa.uint8() if pa.types.is_boolean(t)
                                      else pa.list_(pa.uint8()))
            why = "booleans stored as uint8 (0/1)"
        else:
            renamed = column.with_name(RENAMED_PREFIX + column.name)
            if _storable(renamed):
                target, why = renamed, f"renamed {renamed.name}: the run layout reserves its name"
            else:
                log.warning("bridge: column '%s' (%s) is left out: a live stream stores numbers "
                            "only", column.name, t)
                self.stats.left_out.append(column.name)
                return "leave out"
        note[b"lclstream.bridge"] = why.encode()
        log.info("bridge: column '%s': %s", column.name, why)
        return target.with_metadata({**(column.metadata or {}), **note})

    def _handle(self, parts: list) -> None:
        try:
            decoded: Decoded = self.format.decode(parts)
        except BadMessage as exc:
            self.stats.bad += 1
            reason = str(exc)
            self.stats.bad_reasons[reason] = self.stats.bad_reasons.get(reason, 0) + 1
            if self.stats.bad_reasons[reason] == 1:
                log.warning("bridge: skipping a message that is not %s: %s",
                            self.format.name, reason)
            return
        if decoded.metadata:
            self._flush()  # rows already gathered keep the metadata they came with
            self._metadata.update(decoded.metadata)
        if decoded.batch is not None and decoded.batch.num_rows:
            decoded.batch = self._storable(decoded.batch)
            if self._pending and not decoded.batch.schema.equals(self._pending[0].schema):
                self._flush()
            self._pending.append(decoded.batch)
            self._pending_events += decoded.batch.num_rows
            self._pending_bytes += decoded.batch.nbytes
            if (self._pending_bytes >= self.batch_bytes
                    or (self.batch_events is not None
                        and self._pending_events >= self.batch_events)):
                self._flush()
        if decoded.end:
            self._flush()

    def _flush(self) -> None:
        """Hand the gathered rows to the sender thread (waiting while it has two batches in
        hand: then the message queue fills, and overflows, rather than memory)."""
        if not self._pending:
            return
        batches, self._pending = self._pending, []
        self._pending_events = self._pending_bytes = 0
        metadata = dict(self._metadata)
        while not self._to_send_put((batches, metadata)):
            if self._sender_error is not None:
                raise self._sender_error

    def _to_send_put(self, item: object) -> bool:
        try:
            self._to_send.put(item, timeout=0.5)
        except queue_module.Full:
            return False
        return True

    def _send_loop(self) -> None:
        """The sender thread: joins each batch's rows and sends them while the main thread
        decodes the next messages."""
        try:
            while (item := self._to_send.get()) is not None:
                self._send(*item)
        except BaseException as exc:  # reported by run(); the bridge stops
            self._sender_error = exc
            while self._to_send.get() is not None:  # let the main thread finish
                pass

    def _send(self, batches: list[pa.RecordBatch], metadata: dict[str, str]) -> None:
        batch = batches[0] if len(batches) == 1 else pa.concat_batches(batches)
        if metadata:
            merged = {**(batch.schema.metadata or {}),
                      **{k.encode(): v.encode() for k, v in metadata.items()}}
            batch = batch.replace_schema_metadata(merged)
        self.producer.dropped = self.stats.dropped
        new_schema = self._sent_schema is None or not batch.schema.equals(self._sent_schema)
        try:
            if new_schema:
                # The stream may refuse another schema: what went before is stored first, and
                # the answer is awaited, so a refusal costs exactly this batch.
                self.producer.flush()
                self.producer.send(batch)
                self.producer.flush()
            else:
                self.producer.send(batch)
        except (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError):
            raise  # no batch would be taken: the bridge stops and says why
        except (flight.FlightError, pa.ArrowException) as exc:
            # The stream would not take it (another schema, ended): its events are refused
            # and counted; the stream keeps what it has.
            self.stats.refused += batch.num_rows
            self.stats.last_error = str(exc).split(". Detail:")[0]
            log.error("bridge: the stream refused %d events: %s", batch.num_rows,
                      self.stats.last_error)
            self.producer.discard_refused()
            self._sent_schema = None
            return
        self._sent_schema = batch.schema
        self.stats.events += batch.num_rows
        self.stats.batches += 1
        if self.on_batch is not None:
            self.on_batch(batch)

def _storable(field: pa.Field) -> bool:
    try:
        run_writer.check_schema(pa.schema([field]))
    except InvalidArgument:
        return False
    return True
