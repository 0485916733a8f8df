"""Live streams from Python: `Producer` pushes batches, `Subscription` iterates over them.

    >>> with client.producer("tmox42619", "daq") as p:      # needs the `write` grant
    ...     p.send(batch)
    >>> for batch in client.subscribe("tmox42619", "daq", from_="earliest"):
    ...     ...

Both survive a server restart: the producer resends what was not acknowledged (the server
drops what it already stored, by sequence number), and a subscription reconnects and resumes
at the offset after the last batch it delivered (a group member, after its group's commits).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from schemas.live import LIVE_SEGMENT, Ack, Delivery, ProducerMeta, is_going_away, owner_named_in
from schemas.live import Subscription as Request
from schemas.request import compression_choice

log = logging.getLogger(__name__)

# What a lost connection looks like while the server restarts; anything else is an answer.
TRANSIENT = (flight.FlightUnavailableError, ConnectionError)


def transient(exc: BaseException) -> bool:
    """Whether an error is the connection or the server going away (worth retrying)."""
    if isinstance(exc, TRANSIENT):
        return True
    # A server killed mid-stream can reset the HTTP/2 stream, which gRPC reports as INTERNAL.
    return isinstance(exc, flight.FlightInternalError) and "RST_STREAM" in str(exc)


class Backoff:
    """The wait between attempts to reach a server that is restarting: 0.1 s, doubling to 2 s,
    for at most `patience` seconds from the first failure since the last success."""

    def __init__(self, patience: float, first: float = 0.1, longest: float = 2.0) -> None:
        self.patience, self.first, self.longest = patience, first, longest
        self.succeeded()

    def succeeded(self) -> None:
        self._deadline: float | None = None
        self._delay = self.first

    def wait(self) -> bool:
        """Sleep before the next attempt; False (at once) when patience has run out."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.patience
        if now > self._deadline:
            return False
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, self.longest)
        return True


class Producer:
    """Sends batches to a live stream; each is acknowledged once durable on the server.

    `send` returns as soon as the batch is on its way; at most `max_unacked_bytes` are held
    for resending until acknowledged. `flush` waits for every acknowledgement, `close` ends the
    connection (the stream stays live for the next producer), `end_run` closes and turns the
    stream into a run of its experiment."""

    def __init__(self, flight_client: flight.FlightClient, experiment: str, stream: str, *,
                 producer_id: str | None = None, retention_bytes: int | None = None,
                 retention_seconds: float | None = None,
                 max_unacked_bytes: int = 256 << 20, reconnect_for: float = 60.0,
                 follow: Follow | None = None) -> None:
        self._flight = flight_client
        # a cluster: the connection to a location (a live stream is its owner node's); after
        # following, a lost owner sends the producer back home, to be told the new one
        self._home, self._follow = flight_client, follow
        self._owner: str | None = None
        self.experiment, self.stream = experiment, stream
        self.producer_id = producer_id or uuid.uuid4().hex
        self._retention = {k: v for k, v in (("bytes", retention_bytes),
                                             ("seconds", retention_seconds)) if v is not None}
        self.max_unacked_bytes = max_unacked_bytes
        self.reconnect_for = reconnect_for
        self._seq = 0
        self._unacked: OrderedDict[int, pa.RecordBatch] = OrderedDict()
        self._unacked_bytes = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._writer: flight.FlightStreamWriter | None = None
        self._writer_lock = threading.Lock()  # the ack reader may finish the call
        self._acks: threading.Thread | None = None
        self._schema: pa.Schema | None = None
        self.last_ack: Ack | None = None
        self.duplicates = 0  # resends the server recognised and did not store again
        # What the caller dropped before sending (a bridge's full queue): set it, and the next
        # batch tells the server, which lists it with the stream.
        self.dropped = 0
        self._sent_dropped = 0
        self.reconnects = 0

    @property
    def descriptor(self) -> flight.FlightDescriptor:
        return flight.FlightDescriptor.for_path(self.experiment, LIVE_SEGMENT, self.stream)

    # -- sending -----------------------------------------------------------------------------

    def send(self, batch: pa.RecordBatch | pa.Table, seq: int | None = None) -> int:
        """Queue one batch (a Table is sent batch by batch); returns its sequence number.

        `seq` numbers the batch yourself (it must increase): a producer that numbers its batches
        by their place in its input can restart anywhere, and the stream stores each once."""
        if isinstance(batch, pa.Table):
            if seq is not None:
                raise ValueError("give `seq` with a RecordBatch, not a Table")
            last = self._seq
            for b in batch.to_batches():
                last = self.send(b)
            return last
        if seq is not None and seq <= self._seq:
            raise ValueError(f"seq must increase: {seq} after {self._seq}")
        self._raise_error()
        if self._writer is None or not batch.schema.equals(self._schema):
            # A new schema means a new DoPut: the server decides whether the stream takes it.
            self._close_connection()
            self._open(batch.schema)
        with self._cond:
            while self._unacked_bytes > self.max_unacked_bytes and self._error is None:
                self._cond.wait(0.5)
            self._raise_error()
            self._seq = self._seq + 1 if seq is None else seq
            seq = self._seq
            self._unacked[seq] = batch
            self._unacked_bytes += batch.nbytes
        self._write(seq, batch)
        return seq

    def _meta(self, seq: int) -> pa.Buffer:
        retention = self._retention if seq == 1 or not self._sent_retention else None
        self._sent_retention = True
        dropped = self.dropped if self.dropped != self._sent_dropped else None
        self._sent_dropped = self.dropped
        return pa.py_buffer(ProducerMeta(self.producer_id, seq, retention or None,
                                         dropped).encode())

    def _write(self, seq: int, batch: pa.RecordBatch) -> None:
        try:
            with self._writer_lock:
                self._writer.write_with_metadata(batch, self._meta(seq))
        except Exception as exc:
            if not self._released:
                self._check_answer(exc)
            self._reconnect()

    def _check_answer(self, exc: BaseException) -> None:
        """After a failed write: raise the server's answer if it refused the call (it reaches
        the ack reader, not the writer), or `exc` if it is not a lost connection."""
        if self._acks is not None:
            self._acks.join(timeout=5)
        if self._follow and self._owner is None:
            self._owner = owner_named_in(exc)  # a cluster node's answer may reach the writer
        if self._error is None and not transient(exc):
            self._fail(exc)
        self._raise_error()

    def _open(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._released = False
        self._sent_retention = False
        self._sent_dropped = 0  # a new call: tell the server again
        writer, reader = self._flight.do_put(self.descriptor, schema)
        self._writer = writer
        self._acks = threading.Thread(target=self._read_acks, args=(reader,), daemon=True,
                                      name="lclstream-producer-acks")
        self._acks.start()

    def _read_acks(self, reader: flight.FlightMetadataReader) -> None:
        try:
            while (buf := reader.read()) is not None:
                if is_going_away(buf.to_pybytes()):
                    self._let_go()
                    continue
                ack = Ack.decode(buf.to_pybytes())
                with self._cond:
                    batch = self._unacked.pop(ack.seq, None)
                    if batch is not None:
                        self._unacked_bytes -= batch.nbytes
                    self.duplicates += ack.duplicate
                    if not ack.duplicate:
                        self.last_ack = ack
                    self._cond.notify_all()
        except Exception as exc:
            self._owner = owner_named_in(exc) if self._follow else None
            if not transient(exc):
                self._fail(exc)
            with self._cond:
                self._cond.notify_all()

    def _let_go(self) -> None:
        """The server is stopping: finish the call now, so it need not wait for our next batch;
        the next `send` or `flush` reconnects and resends what was not acknowledged."""
        with self._writer_lock:
            if self._writer is not None:
                self._released = True
                try:
                    self._writer.done_writing()
                except Exception as exc:  # the connection went first: same outcome
                    log.debug("producer %s: finishing the call: %s", self.producer_id, exc)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _reconnect(self) -> None:
        """Open a new DoPut and resend everything not acknowledged, in order."""
        backoff = Backoff(self.reconnect_for)
        while True:
            self._close_connection(quiet=True)
            self._flight = _next_node(self._flight, self._home, self._follow, self._owner)
            self._owner = None
            try:
                self._open(self._schema)
                with self._cond:
                    pending = list(self._unacked.items())
                for seq, batch in pending:
                    with self._writer_lock:
                        self._writer.write_with_metadata(batch, self._meta(seq))
                log.info("producer %s: reconnected, resent %d batches", self.producer_id,
                         len(pending))
                self.reconnects += 1
                return
            except Exception as exc:
                self._check_answer(exc)
                if self._owner is not None:
                    continue  # told where the stream is: go there at once
                if not backoff.wait():
                    self._fail(exc)
                    self._raise_error()

    # -- finishing ---------------------------------------------------------------------------

    def _close_connection(self, quiet: bool = False) -> None:
        """Finish the DoPut: the server syncs and sends the remaining acks before it returns."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.done_writing()
            if self._acks is not None:
                self._acks.join()
            writer.close()
        except Exception as exc:
            if not quiet and not transient(exc):
                self._fail(exc)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every batch sent so far is acknowledged (durable on the server)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(self.reconnect_for)  # calls that end unacknowledged, in a row
        while True:
            with self._cond:
                waiting = len(self._unacked)
                while self._unacked and self._error is None:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{len(self._unacked)} batches not acknowledged "
                                           f"after {timeout} s")
                    if self._acks is not None and not self._acks.is_alive():
                        break  # the connection dropped: resend below
                    self._cond.wait(0.2)
            self._raise_error()
            if not self._unacked:
                return
            if len(self._unacked) < waiting:
                backoff.succeeded()  # acknowledgements came: a flaky link, not a dead end
            # The call ended with batches unacknowledged: its status says whether the server
            # refused them (raised here), the connection was lost or the server cannot take
            # them now (resent, for up to reconnect_for), or another node owns the stream.
            with self._writer_lock:
                writer, self._writer = self._writer, None
            last: BaseException = flight.FlightUnavailableError("the call ended")
            try:
                if writer is not None:
                    writer.close()
            except Exception as exc:
                last = exc
                self._check_answer(exc)
            if self._owner is None and not backoff.wait():
                self._fail(last)
                self._raise_error()
            self._reconnect()

    def discard_refused(self) -> None:
        """After the server refused a batch (raised by `send` or `flush`): forget what it did
        not acknowledge and the error, so that batches the stream does take can follow (a
        bridge whose source changed its schema goes on). Flush before sending a batch the
        stream may refuse, so that nothing else is forgotten with it."""
        with self._cond:
            self._error = None
            self._unacked.clear()
            self._unacked_bytes = 0
        self._close_connection(quiet=True)
        self._schema = None
        with self._cond:
            self._error = None

    def close(self) -> None:
        """Send what is queued, wait for every acknowledgement, end the connection."""
        if self._writer is not None:
            self.flush()
            self._close_connection()
        self._raise_error()

    def end_run(self, run: int | None = None, config: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """Close, then end the stream: it becomes run `run` (default: the next free number) of
        the experiment, readable like any archived run. Returns {"run", "events", ...}."""
        self.close()
        body: dict[str, Any] = {"experiment": self.experiment, "stream": self.stream}
        if run is not None:
            body["run"] = run
        if config is not None:
            body["config"] = config
        return action(self._flight, "end_run", body)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._close_connection(quiet=True)


Follow = Callable[[str], flight.FlightClient]  # a location -> a connection to it


def _next_node(current: flight.FlightClient, home: flight.FlightClient,
               follow: Follow | None, owner: str | None) -> flight.FlightClient:
    """Where to ask next: the owner a cluster node named; after a failure elsewhere than
    home, home again (a node that owned the stream is gone: home says who owns it now)."""
    if follow is None:
        return current
    if owner is not None:
        return follow(owner)
    return home


def action(flight_client: flight.FlightClient, name: str, body: dict[str, Any]) -> Any:
    import json

    results = list(flight_client.do_action(flight.Action(name, json.dumps(body).encode())))
    return json.loads(results[0].body.to_pybytes()) if results else None


class Subscription:
    """Iterate over a live stream's batches: the stored ones from `from_`, then new ones as
    they arrive, until the stream ends (it became a run) or you stop.

    `offset`/`next` are the stream offsets of the last batch delivered; after a server
    restart the iteration resumes at `next` by itself. In a group, call `commit()` once a
    batch's work is done: a member that restarts gets back what it did not commit."""

    def __init__(self, flight_client: flight.FlightClient, experiment: str, stream: str, *,
                 from_: str | int | dt.datetime = "earliest", group: str | None = None,
                 member: str | None = None, columns: Sequence[str] | None = None,
                 filter: str | None = None, processing: Sequence[dict] | None = None,
                 reconnect_for: float = 60.0, skip_empty: bool = True,
                 compression: str | None = None, follow: Follow | None = None) -> None:
        self._flight = flight_client
        self._home, self._follow = flight_client, follow  # as for Producer
        if isinstance(from_, dt.datetime):
            from_ = (from_ if from_.tzinfo else from_.replace(tzinfo=dt.UTC)).isoformat()
        self.request = Request(experiment, stream, from_, group,
                               member or (uuid.uuid4().hex if group else None),
                               None if columns is None else tuple(columns), filter,
                               None if processing is None else tuple(processing),
                               *compression_choice(compression))
        self.reconnect_for = reconnect_for
        self.skip_empty = skip_empty
        self.offset: int | None = None
        self.next: int | None = None
        self.schema: pa.Schema | None = None
        self._reader: flight.FlightStreamReader | None = None
        self._closed = False

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        backoff = Backoff(self.reconnect_for)
        while not self._closed:
            request = self.request
            if self.next is not None and request.group is None:
                request = Request(**{**request.__dict__, "start": self.next})
            try:
                self._reader = self._flight.do_get(flight.Ticket(request.encode()))
                self.schema = self._reader.schema
                for chunk in self._reader:
                    backoff.succeeded()  # connected and delivering
                    delivery = Delivery.decode(chunk.app_metadata.to_pybytes())
                    self.offset, self.next = delivery.offset, delivery.next
                    if chunk.data.num_rows or not self.skip_empty:
                        yield chunk.data
                return  # the stream ended
            except Exception as exc:
                if self._closed:
                    return
                if not transient(exc):
                    raise
                owner = owner_named_in(exc) if self._follow else None
                self._flight = _next_node(self._flight, self._home, self._follow, owner)
                if owner is not None:
                    continue  # told where the stream is: go there at once
                log.info("subscription to %s/%s lost (%s); resuming at %s", request.experiment,
                         request.stream, type(exc).__name__, self.next)
                if not backoff.wait():
                    raise

    def commit(self, offset: int | None = None) -> dict[str, Any]:
        """Tell the group everything received up to `offset` (default: all so far) is done."""
        if self.request.group is None:
            raise ValueError("commit is for group subscriptions (subscribe with group=...)")
        upto = self.next if offset is None else offset
        if upto is None:
            return {"committed_events": 0}
        body = {"experiment": self.request.experiment, "stream": self.request.stream,
                "group": self.request.group, "member": self.request.member, "offset": upto}
        backoff = Backoff(self.reconnect_for)
        while True:  # a server restarting: commit once it is back (what it has not seen
            try:     # committed it delivers again; at-least-once)
                return action(self._flight, "commit", body)
            except Exception as exc:
                if not transient(exc) or not backoff.wait():
                    raise

    def close(self) -> None:
        """Stop: the server frees the subscription; in a group, what was not committed goes to
        the other members."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
