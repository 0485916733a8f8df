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

log = logging.getLogger(__name__)

SUFFIX = ".arrows"  # the registered extension of the Arrow IPC stream format


@dataclass(eq=False)
class Segment:
    base: int
    path: Path
    size: int = 0
    last_time_ns: int = 0
    events: int = 0


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
        self.written = 0  # bytes appended and not yet synced
        self._recover()

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

    def create(self, schema: pa.Schema) -> None:
        self.schema = schema

    def append(self, batch: pa.RecordBatch, producer: str | None, seq: int | None) -> Entry:
        """Write one batch at the end of the log (not yet synced)."""
        if self._writer is None or self._active.size >= self.segment_bytes:
            self._roll()
        now = time.time_ns()
        meta = {"offset": str(self.end), "time": str(now)}
        if producer is not None:
            meta |= {"producer": producer, "seq": str(seq)}
        position = self._sink.tell()
        self._writer.write_batch(batch, custom_metadata=meta)
        length = self._sink.tell() - position
        segment = self._active
        entry = Entry(self.end, batch.num_rows, segment, position, length, now, producer, seq)
        segment.size += length
        segment.events += batch.num_rows
        segment.last_time_ns = now
        self.entries.append(entry)
        self.end = entry.end
        self.written += length
        return entry

    def _roll(self) -> None:
        """Start a new segment; the old one is synced and closed first (it is complete)."""
        if self.schema is None:
            raise InvalidArgument("the stream has no schema yet")
        self._close_active()
        path = self.directory / f"{self.end:020d}{SUFFIX}"
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_stream(self._sink, self.schema)
        self._active = Segment(self.end, path, size=self._sink.tell())
        self.segments.append(self._active)
        _sync_directory(self.directory)  # the new file's name must survive a power cut too

    def _close_active(self) -> None:
        if self._writer is not None:
            self._sink.flush()
            os.fsync(self._sink.fileno())
            self._writer = None  # no end-of-stream marker: a segment is extended only by new
            self._sink.close()  # segments, and readers index messages, not whole files
            self._sink = None
            self.written = 0

    def sync_handle(self) -> int | None:
        """A duplicate descriptor of the active segment, for fsync outside the stream's lock
        (a roll may close the segment meanwhile); None when nothing is unsynced."""
        if self._sink is None or not self.written:
            return None
        self.written = 0
        return os.dup(self._sink.fileno())

    def close(self) -> None:
        self._close_active()

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


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
