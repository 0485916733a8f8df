"""One live stream: its log, the ring of recent batches, its producers, consumers and groups.

Appends write to the log and put the batch in a bounded in-memory ring, then wake the
consumers. Consumers pull: each reads from the ring while it keeps up and from the log's
segments when it has fallen behind the ring, so a slow consumer costs the others and the
producer nothing but its own disk reads. A producer's ack is written once its batch is synced.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.config import LiveSettings
from flight_server.errors import InvalidArgument, NotFound
from flight_server.fsutil import atomic_write, fsync_path
from flight_server.live.groups import Group, Span
from flight_server.live.log import Entry, SegmentLog
from schemas.json_input import RequestError
from schemas.live import EARLIEST, GOING_AWAY, LATEST, Ack, Subscription, check_retention

log = logging.getLogger(__name__)

RECENT_SEQS = 4096  # per producer: seq -> offset, to answer a resend with the original offset
RATE_WINDOW_S = 10.0


class Dropped(NotFound):
    """Offsets a consumer asked for that retention has already removed (NOT_FOUND)."""


class AckSession:
    """One producer connection: the acks it is owed, written once their batches are synced.
    The flusher thread writes acks while the handler thread reads the next batch (gRPC allows
    one reader and one writer at a time); `close` stops all writing before the call ends."""

    def __init__(self, writer: flight.FlightMetadataWriter,
                 is_cancelled: Callable[[], bool] = lambda: False) -> None:
        self._writer = writer
        # A producer that died mid-call (a killed worker): its call is cancelled before its
        # handler notices; nothing is written to it then.
        self._is_cancelled = is_cancelled
        self._owed: deque[tuple[int, Ack]] = deque()  # (durable end needed, ack)
        self._lock = threading.Lock()
        self._closed = False

    def owe(self, needs: int, ack: Ack) -> None:
        with self._lock:
            self._owed.append((needs, ack))

    def settle(self, durable: int) -> None:
        with self._lock:
            while self._owed and self._owed[0][0] <= durable and not self._closed:
                if self._is_cancelled():
                    self._closed = True
                    return
                self._writer.write(pa.py_buffer(self._owed.popleft()[1].encode()))

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def going_away(self) -> None:
        """Ask the producer to finish its call: an idle producer otherwise keeps the server's
        shutdown waiting, blocked as it is in reading the producer's next batch."""
        with self._lock:
            if not self._closed and not self._is_cancelled():
                self._writer.write(pa.py_buffer(GOING_AWAY))

    @property
    def owed(self) -> int:
        return len(self._owed)


class Stream:
    def __init__(self, experiment: str, name: str, directory: Path, settings: LiveSettings,
                 wake_flusher: Callable[[], None] = lambda: None) -> None:
        self.experiment, self.name, self.directory = experiment, name, directory
        self.settings = settings
        self._wake_flusher = wake_flusher
        # Three locks, always taken in this order: `_sync_lock` (one sync at a time, so a sync
        # never reports durable what another is still syncing), `_write_lock` (appends: the
        # disk write happens here, without holding up consumers), `cond` (what consumers see).
        self._sync_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.cond = threading.Condition()
        self.log = SegmentLog(directory / "segments", settings.segment_bytes)
        self.state = self._load_state()
        self.durable = self.log.end  # recovered segments are synced below
        for segment in self.log.segments:
            fsync_path(segment.path)  # after a crash, what the page cache kept becomes durable
        self.ring: deque[Entry] = deque()
        self.ring_bytes = 0
        self.producers: dict[str, OrderedDict[int, Entry]] = {}
        for entry in self.log.entries:
            self._remember(entry)
        self.sessions: set[AckSession] = set()
        self.groups: dict[str, Group] = {}
        for path in sorted((directory / "groups").glob("*.json")):
            group = Group.load(path.stem, path)
            if group is not None:
                self.groups[group.name] = group
        self.connected_producers = 0
        self.consumers = 0
        self.stopping = False
        self.ending = False  # an end_run is writing the run file: no producer may attach
        self._arrivals: deque[tuple[float, int, int]] = deque()  # (time, events, bytes)
        self.ingested_events = 0  # stored since the server started (the metrics' counters)
        self.ingested_bytes = 0

    # -- state -------------------------------------------------------------------------------

    def _load_state(self) -> dict:
        try:
            state = json.loads((self.directory / "stream.json").read_text())
        except FileNotFoundError:
            return {}
        if "retention" in state:
            try:
                check_retention(state["retention"])
            except RequestError as exc:  # saved by an older server that took any number
                log.warning("stream %s/%s: ignoring its saved retention (%s); the server's "
                            "defaults apply", self.experiment, self.name, exc)
                del state["retention"]
        return state

    def _save_state(self) -> None:
        atomic_write(self.directory / "stream.json", json.dumps(self.state, indent=1).encode())

    @property
    def schema(self) -> pa.Schema | None:
        return self.log.schema

    @property
    def key(self) -> tuple[str, str]:
        return self.experiment, self.name

    def unused(self) -> bool:
        """Nothing stored, nobody connected, no state: as if it had never been created."""
        with self.cond:
            return not (self.log.segments or self.connected_producers or self.consumers
                        or self.groups or self.state)

    @property
    def ended(self) -> dict | None:
        """{"run": N, "events": n} once the stream has ended as a run."""
        return self.state.get("ended")

    @property
    def retention(self) -> tuple[int, float]:
        kept = self.state.get("retention", {})
        return (int(kept.get("bytes", self.settings.retention_bytes)),
                float(kept.get("seconds", self.settings.retention_seconds)))

    def note_dropped(self, producer: str, dropped: int) -> None:
        """A producer's count of what it dropped before sending (a bridge's overflowing queue),
        kept with the stream's state; written only when it grows, which is rare."""
        with self.cond:
            counts = self.state.setdefault("dropped", {})
            if dropped > counts.get(producer, 0):
                counts[producer] = dropped
                self._save_state()

    def set_retention(self, retention: dict[str, float]) -> None:
        with self.cond:
            self.state["retention"] = {**self.state.get("retention", {}), **retention}
            self._save_state()

    # -- ending -----------------------------------------------------------------------------

    def begin_ending(self) -> dict | None:
        """Stop taking producers before the run file is written; the stream's `ended` record
        instead if it has ended already (a retried end_run)."""
        with self.cond:
            if self.ended:
                return self.ended
            if self.connected_producers:
                raise InvalidArgument(
                    f"stream '{self.name}' still has {self.connected_producers} producer(s) "
                    "connected; close them first, then end the run")
            if self.schema is None:
                raise InvalidArgument(f"stream '{self.name}' has no events to make a run of")
            self.ending = True
            return None

    def finish_ending(self, ended: dict | None) -> None:
        """Record the run the stream became (tailing consumers then finish), or, with None, give
        up ending it."""
        with self.cond:
            if ended is not None:
                self.state["ended"] = ended
                self._save_state()
                self.cond.notify_all()
            self.ending = False

    # -- producing ---------------------------------------------------------------------------

    def attach(self, schema: pa.Schema, session: AckSession) -> None:
        """A producer connects with `schema`: the first one sets the stream's schema."""
        with self.cond:
            if self.ended:
                raise InvalidArgument(
                    f"stream '{self.name}' of '{self.experiment}' ended as run "
                    f"{self.ended['run']}; a new acquisition needs a new stream name")
            if self.ending:
                raise InvalidArgument(f"stream '{self.name}' is ending; no new producers")
            if self.log.schema is None:
                self.log.create(schema)
            elif not schema.equals(self.log.schema):
                difference = schema_difference(self.log.schema, schema)
                raise InvalidArgument(
                    f"the batches' schema differs from stream '{self.name}': {difference}. A "
                    "stream keeps one schema; send the same columns and types, or use a new "
                    "stream")
            self.connected_producers += 1
            self.sessions.add(session)

    def detach(self, session: AckSession) -> None:
        """The producer is done: sync, write every ack it is owed, then stop writing to it."""
        self.sync()
        with self.cond:
            self.sessions.discard(session)
            self.connected_producers -= 1
        session.close()

    def append(self, batch: pa.RecordBatch, producer: str | None, seq: int | None,
               session: AckSession, admit: Callable[[], None] | None = None) -> None:
        """Store one batch. `admit` (a job's producer: is the job still running?) is checked
        under the write lock, so that once `fence` returns nothing it refuses is stored."""
        with self._write_lock:
            if admit is not None:
                admit()
            if self.ended or self.ending:
                raise InvalidArgument(f"stream '{self.name}' has ended; the batch was not stored")
            seen = self.producers.get(producer) if producer is not None else None
            if seen and seq <= next(reversed(seen)):
                original = seen.get(seq)
                ack = Ack(seq, original.offset if original else -1, batch.num_rows, True)
                session.owe(original.end if original else 0, ack)
                return
            segments = len(self.log.segments)
            entry = self.log.append(batch, producer, seq)
            entry.batch = batch
            self._remember(entry)
            rolled = len(self.log.segments) > segments
            with self.cond:
                self.log.publish(entry)
                self.ring.append(entry)
                self.ring_bytes += batch.nbytes
                while self.ring_bytes > self.settings.ring_bytes and len(self.ring) > 1:
                    old = self.ring.popleft()
                    self.ring_bytes -= old.batch.nbytes
                    old.batch = None
                self.ingested_events += entry.events
                self.ingested_bytes += entry.length
                now = time.monotonic()
                self._arrivals.append((now, entry.events, entry.length))
                while self._arrivals[0][0] < now - RATE_WINDOW_S:
                    self._arrivals.popleft()
                session.owe(entry.end, Ack(seq, entry.offset, entry.events))
                self.cond.notify_all()
        if rolled:
            self.apply_retention()
        if self.settings.fsync == "batch":
            self._wake_flusher()  # group commit: the flusher syncs while this reads on

    def snapshot(self) -> pa.Table:
        """Every event the stream holds now (for SQL): what retention has dropped meanwhile is
        left out."""
        with self.cond:
            entries, schema = list(self.log.entries), self.schema
        batches = []
        for entry in entries:
            try:
                batches.append(self.batch_at(entry))
            except Dropped:
                continue
        return pa.Table.from_batches(batches, schema=schema)

    def fence(self) -> None:
        """Return once every append that started before the call has finished."""
        with self._write_lock:
            pass

    def last_seq(self, producers: Callable[[str], bool]) -> int | None:
        """The highest seq stored from the producers `producers` selects (None: none)."""
        with self._write_lock:
            seqs = [next(reversed(seen)) for name, seen in self.producers.items()
                    if seen and producers(name)]
        return max(seqs, default=None)

    def _remember(self, entry: Entry) -> None:
        if entry.producer is None:
            return
        seen = self.producers.setdefault(entry.producer, OrderedDict())
        seen[entry.seq] = entry
        if len(seen) > RECENT_SEQS:
            seen.popitem(last=False)

    def sync(self) -> None:
        """Make everything appended so far durable, then write the acks that settles."""
        if not self.sessions and self.durable >= self.log.end:
            return  # no producer, nothing unsynced: the flusher passes idle streams by cheaply
        with self._sync_lock:
            with self._write_lock:
                work, target = self.log.take_unsynced(), self.log.end
            work.run()
            with self.cond:
                self.durable = max(self.durable, target)
                sessions, durable = list(self.sessions), self.durable
        for session in sessions:
            session.settle(durable)

    def apply_retention(self, now_ns: int | None = None) -> None:
        """Delete the oldest sealed segments beyond the stream's bytes or age."""
        keep_bytes, keep_seconds = self.retention
        oldest = (now_ns or time.time_ns()) - int(keep_seconds * 1e9)
        with self.cond:
            total = self.log.nbytes
            doomed = []
            for segment in self.log.sealed():
                if total > keep_bytes or segment.last_time_ns < oldest:
                    doomed.append(segment)
                    total -= segment.size
                else:
                    break
            for segment in doomed:
                for entry in self.ring:
                    if entry.segment is segment and entry.batch is not None:
                        self.ring_bytes -= entry.batch.nbytes
                self.ring = deque(e for e in self.ring if e.segment not in doomed)
            self.log.drop(doomed)
        for segment in doomed:
            log.info("retention: dropped %s of stream %s/%s (%d events)", segment.path.name,
                     self.experiment, self.name, segment.events)

    # -- consuming ---------------------------------------------------------------------------

    def _index(self, offset: int) -> int:
        """Index in the log's entries of the batch holding `offset` (caller holds the lock)."""
        return bisect.bisect_right(self.log.entries, offset, key=lambda e: e.offset) - 1

    def resolve(self, sub: Subscription) -> int:
        """The offset a subscription starts at."""
        with self.cond:
            start, end = self.log.start, self.log.end
            if sub.start == EARLIEST:
                return start
            if sub.start == LATEST:
                return end
            if isinstance(sub.start, int):
                if sub.start > end:
                    raise InvalidArgument(
                        f"offset {sub.start} is beyond the end of stream '{self.name}' (next "
                        f"offset {end}); subscribe from 'latest' to wait for new events")
                if sub.start < start:
                    raise Dropped(self._dropped_message(sub.start))
                return sub.start
            wanted = sub.start_time_ns()
            for entry in self.log.entries:  # append times only grow
                if entry.time_ns >= wanted:
                    return entry.offset
            return end

    def _dropped_message(self, offset: int) -> str:
        keep_bytes, keep_seconds = self.retention
        return (f"offset {offset} of stream '{self.name}' was removed by retention (it keeps "
                f"{keep_bytes / 2**30:.3g} GiB and {keep_seconds / 3600:.3g} h); the oldest "
                f"kept is {self.log.start}: subscribe from 'earliest'")

    def batch_at(self, entry: Entry) -> pa.RecordBatch:
        held = entry.batch
        if held is not None:
            return held
        try:
            return self.log.read(entry)
        except FileNotFoundError:
            raise Dropped(self._dropped_message(entry.offset)) from None

    def _batch_end(self, offset: int) -> int | None:
        if offset >= self.log.end:
            return None
        if offset < self.log.start:
            raise Dropped(self._dropped_message(offset))
        return self.log.entries[self._index(offset)].end

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            sessions = list(self.sessions)
        for session in sessions:
            session.going_away()

    def check_running(self) -> None:
        if self.stopping:
            raise flight.FlightUnavailableError(
                "the server is shutting down; clients reconnect and resume when it is back")

    def _wait(self, is_cancelled: Callable[[], bool]) -> bool:
        """Wait for an append (lock held); False once the client has gone."""
        self.check_running()
        if is_cancelled():
            return False
        self.cond.wait(self.settings.wait_poll)
        self.check_running()
        return not is_cancelled()

    def tail(self, offset: int, is_cancelled: Callable[[], bool]) -> Iterator[
            tuple[pa.RecordBatch, Span]]:
        """Batches from `offset` on, then new ones as they come, until the stream ends."""
        with self.cond:
            self.consumers += 1
        try:
            while True:
                with self.cond:
                    while offset >= self.log.end and not self.ended:
                        if not self._wait(is_cancelled):
                            return
                    if offset >= self.log.end:
                        return  # ended, and all delivered
                    if offset < self.log.start:
                        raise Dropped(self._dropped_message(offset))
                    at = self._index(offset)
                    entries = self.log.entries[at:at + 64]
                for entry in entries:
                    batch = self.batch_at(entry)
                    if offset > entry.offset:
                        batch = batch.slice(offset - entry.offset)
                    yield batch, (offset, entry.end)
                    offset = entry.end
                    if is_cancelled():
                        return
                    self.check_running()
        finally:
            with self.cond:
                self.consumers -= 1

    def group(self, name: str, first: Subscription) -> Group:
        with self.cond:
            group = self.groups.get(name)
            if group is None:
                path = self.directory / "groups" / f"{name}.json"
                path.parent.mkdir(exist_ok=True)
                group = Group.load(name, path)
                if group is None:
                    group = Group(name, path, self.resolve(first))
                    group.save()
                self.groups[name] = group
            return group

    def member(self, group: Group, member: str,
               is_cancelled: Callable[[], bool]) -> Iterator[tuple[pa.RecordBatch, Span]]:
        """Batches for one member of a group: each batch to exactly one member."""
        with self.cond:
            # A member reconnecting after a network fault may find its old call not yet gone:
            # that call notices its client left within `wait_poll`, and leaves.
            deadline = time.monotonic() + 4 * self.settings.wait_poll
            while member in group.connected and time.monotonic() < deadline:
                self.cond.wait(self.settings.wait_poll / 4)
            if member in group.connected:
                raise InvalidArgument(f"member '{member}' of group '{group.name}' is already "
                                      "connected; each member needs its own name")
            group.join(member)
            self.consumers += 1
        finished = False
        try:
            while True:
                with self.cond:
                    span = group.take(member, self._batch_end)
                    while span is None:
                        if self.ended and group.finished(self.log.end):
                            finished = True
                            return
                        if not self._wait(is_cancelled):
                            return
                        span = group.take(member, self._batch_end)
                    entry = self.log.entries[self._index(span[0])]
                batch = self.batch_at(entry)
                if span != (entry.offset, entry.end):
                    batch = batch.slice(span[0] - entry.offset, span[1] - span[0])
                yield batch, span
                if is_cancelled():
                    return
                self.check_running()
        finally:
            with self.cond:
                if finished:
                    group.finish(member)
                else:
                    group.leave(member)
                self.consumers -= 1
                self.cond.notify_all()  # what it gave back may be another member's next batch

    # -- reporting ---------------------------------------------------------------------------

    def describe(self) -> dict:
        now = time.monotonic()
        with self.cond:
            while self._arrivals and self._arrivals[0][0] < now - RATE_WINDOW_S:
                self._arrivals.popleft()
            window = min(RATE_WINDOW_S, max(now - self._arrivals[0][0], 1e-9)) \
                if self._arrivals else RATE_WINDOW_S
            events = sum(a[1] for a in self._arrivals)
            nbytes = sum(a[2] for a in self._arrivals)
            keep_bytes, keep_seconds = self.retention
            return {
                "experiment": self.experiment, "stream": self.name,
                "live": self.ended is None, "run": (self.ended or {}).get("run"),
                "events": self.log.end, "first_offset": self.log.start,
                "bytes_on_disk": self.log.nbytes,
                "events_per_s": round(events / window, 2) if self._arrivals else 0.0,
                "bytes_per_s": round(nbytes / window) if self._arrivals else 0,
                "producers": self.connected_producers, "consumers": self.consumers,
                "dropped_upstream": sum(self.state.get("dropped", {}).values()),
                "retention": {"bytes": keep_bytes, "seconds": keep_seconds},
                "groups": [{"group": g.name, "committed": g.watermark(),
                            "lag": self.log.end - g.watermark(), "members": g.members}
                           for g in self.groups.values()],
            }

    def close(self) -> None:
        with self._sync_lock, self._write_lock, self.cond:
            self.log.close()
            self.cond.notify_all()


def schema_difference(expected: pa.Schema, got: pa.Schema) -> str:
    have = {f.name: f.type for f in expected}
    new = {f.name: f.type for f in got}
    parts = [f"'{n}' is {new[n]}, the stream has {have[n]}" for n in new
             if n in have and new[n] != have[n]]
    parts += [f"'{n}' is new" for n in new if n not in have]
    parts += [f"'{n}' is missing" for n in have if n not in new]
    return "; ".join(parts) or "the column order differs"

