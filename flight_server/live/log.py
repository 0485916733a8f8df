"""A stream's durable log: Arrow IPC stream files ("segments") in the stream's directory.

Each segment, `<first offset, 20 digits>.arrows`, holds the schema and then one message per
appended batch. A message's custom metadata records its offset, producer, sequence number and
append time, so the files describe themselves: after a crash the index is rebuilt from them
alone, and a torn last message (the server died mid-write) is cut off.

Appends are written at once (a server crash keeps them: they are in the page cache) and made
durable against power loss by `sync`, which the stream calls per batch or per interval.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from flight_server.errors import InvalidArgument
from flight_server.fsutil import fsync_path

log = logging.getLogger(__name__)

SUFFIX = ".arrows"  # the registered extension of the Arrow IPC stream format


@dataclass(eq=False)
class Segment:
    base: int
    path: Path
    size: int = 0
    last_time_ns: int = 0
    events: int = 0


@dataclass
class SyncWork:
    sealing: list[pa.NativeFile]
    active: int | None  # a duplicate descriptor of the active segment
    directory: Path | None

    def run(self) -> None:
        for sink in self.sealing:
            os.fsync(sink.fileno())
            sink.close()  # no end-of-stream marker: segments are indexed by message
        if self.active is not None:
            try:
                os.fsync(self.active)
            finally:
                os.close(self.active)
        if self.directory is not None:
            fsync_path(self.directory)


@dataclass(eq=False)
class Entry:
    """One appended batch: where it is on disk, and the batch itself while it is in the ring."""

    offset: int
    events: int
    segment: Segment
    position: int
    length: int
    time_ns: int
    producer: str | None
    seq: int | None
    batch: pa.RecordBatch | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.events


class SegmentLog:
    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.schema: pa.Schema | None = None
        self.segments: list[Segment] = []
        self.entries: list[Entry] = []  # retained batches, in offset order
        self.end = 0  # the next offset
        self._active: Segment | None = None
        self._sink: pa.NativeFile | None = None
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._schema_pending = False
        self._sealing: list[pa.NativeFile] = []  # full segments not yet synced and closed
        self._unsynced = False
        self._new_name = False
        self._recover()
        self._next = self.end  # where the next append goes (`end` is what consumers see)

    @property
    def start(self) -> int:
        """The oldest retained offset."""
        return self.entries[0].offset if self.entries else self.end

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments)

    # -- recovery ----------------------------------------------------------------------------

    def _recover(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        for path in files:
            if self._recover_segment(path) is None:
                break  # a gap: whatever follows cannot be placed; it is kept for inspection
        if self.entries:
            self.end = self.entries[-1].end
        elif self.segments:
            self.end = self.segments[-1].base

    def _recover_segment(self, path: Path) -> Segment | None:
        try:
            base = int(path.name.removesuffix(SUFFIX))
        except ValueError:
            log.warning("ignoring %s: not a segment name", path)
            return None
        expected = self.entries[-1].end if self.entries else None
        if expected is not None and base != expected:
            log.error("segment %s starts at %d but the log ends at %d: not read", path, base,
                      expected)
            return None
        segment = Segment(base, path)
        good = 0
        try:
            source = pa.memory_map(str(path))
            reader = ipc.open_stream(source)
        except (pa.ArrowException, OSError):  # died before the schema was complete
            reader = None
        if reader is not None:
            if self.schema is None:
                self.schema = reader.schema
            elif not reader.schema.equals(self.schema):
                log.error("segment %s has another schema than the stream: not read", path)
                return None
            good = source.tell()
            offset = base
            while True:
                position = source.tell()
                try:
                    batch, meta = reader.read_next_batch_with_custom_metadata()
                except StopIteration:
                    break
                except (pa.ArrowException, OSError):
                    break  # a torn message: the server died while writing it
                entry = _entry(meta, batch.num_rows, segment, position, source.tell() - position)
                if entry is None or entry.offset != offset:
                    log.error("segment %s: message at byte %d is not offset %d; the rest of the "
                              "segment is cut", path, position, offset)
                    break
                self.entries.append(entry)
                segment.events += entry.events
                segment.last_time_ns = entry.time_ns
                offset = entry.end
                good = source.tell()
            source.close()
        size = path.stat().st_size
        if good < size:
            log.warning("segment %s: cutting %d bytes of an unfinished write", path, size - good)
            os.truncate(path, good)
        if good == 0:
            path.unlink()
            return segment  # nothing in it; the next segment (if any) starts at the same base
        segment.size = good
        self.segments.append(segment)
        return segment

    # -- appending ---------------------------------------------------------------------------
    # Appends and syncs are serialised by the caller (the stream's write lock); `publish` and
    # everything consumers read run under the stream's consumer lock.

    def create(self, schema: pa.Schema) -> None:
        self.schema = schema

    def append(self, batch: pa.RecordBatch, producer: str | None, seq: int | None) -> Entry:
        """Write one batch after the last: not yet synced, and not visible until `publish`."""
        if self._writer is None or self._active.size >= self.segment_bytes:
            self._roll()
        now = time.time_ns()
        meta = {"offset": str(self._next), "time": str(now)}
        if producer is not None:
            meta |= {"producer": producer, "seq": str(seq)}
        position = self._sink.tell()
        self._writer.write_batch(batch, custom_metadata=meta)
        written = self._sink.tell()
        if self._schema_pending:  # the writer puts the schema down before a segment's first batch
            position += self.schema.serialize().size
            self._schema_pending = False
        segment = self._active
        entry = Entry(self._next, batch.num_rows, segment, position, written - position, now,
                      producer, seq)
        segment.size = written
        segment.events += batch.num_rows
        segment.last_time_ns = now
        self._next = entry.end
        self._unsynced = True
        return entry

    def publish(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.end = entry.end

    def _roll(self) -> None:
        """Start a new segment. The old one is complete: the next `sync` syncs and closes it,
        so that a roll costs an append no disk wait."""
        if self.schema is None:
            raise InvalidArgument("the stream has no schema yet")
        if self._sink is not None:
            self._sealing.append(self._sink)
        path = self.directory / f"{self._next:020d}{SUFFIX}"
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_stream(self._sink, self.schema)
        self._schema_pending = True
        self._active = Segment(self._next, path)
        self.segments.append(self._active)
        self._new_name = True  # the directory entry must survive a power cut too

    def take_unsynced(self) -> SyncWork:
        """What a sync must make durable; the fsyncs themselves run without any lock."""
        work = SyncWork(self._sealing, None, self.directory if self._new_name else None)
        if self._unsynced and self._sink is not None:
            work.active = os.dup(self._sink.fileno())  # a later roll may close the original
        self._sealing, self._unsynced, self._new_name = [], False, False
        return work

    def close(self) -> None:
        self.take_unsynced().run()
        if self._sink is not None:
            os.fsync(self._sink.fileno())
            self._sink.close()
            self._sink = self._writer = None

    # -- reading and retention ---------------------------------------------------------------

    def read(self, entry: Entry) -> pa.RecordBatch:
        """A batch read back from its segment (memory-mapped: no copy)."""
        with pa.memory_map(str(entry.segment.path)) as source:
            message = ipc.read_message(source.read_at(entry.length, entry.position))
        return ipc.read_record_batch(message, self.schema)

    def drop(self, segments: list[Segment]) -> None:
        """Delete whole sealed segments from the front (retention)."""
        for segment in segments:
            assert segment is self.segments[0] and segment is not self._active
            self.segments.pop(0)
            cut = 0
            while cut < len(self.entries) and self.entries[cut].segment is segment:
                self.entries[cut].batch = None
                cut += 1
            del self.entries[:cut]
            segment.path.unlink(missing_ok=True)

    def sealed(self) -> list[Segment]:
        return [s for s in self.segments if s is not self._active]


def _entry(meta: pa.KeyValueMetadata | None, events: int, segment: Segment, position: int,
           length: int) -> Entry | None:
    try:
        doc = {k.decode(): v.decode() for k, v in (meta or {}).items()}
        seq = doc.get("seq")
        return Entry(int(doc["offset"]), events, segment, position, length, int(doc["time"]),
                     doc.get("producer"), None if seq is None else int(seq))
    except (KeyError, ValueError):
        return None
