"""Where each event of an LCLS-II xtc2 run lies: the run's stream and chunk files, and an index
of their datagrams built from the 24-byte datagram headers alone.

A run is written by several DAQ nodes, one *stream* file each
(``<exp>-r<RUN:04d>-s<STREAM:03d>-c<CHUNK:03d>.xtc2``), each split into *chunks* as it grows.
An event is the set of L1Accept datagrams of one time stamp across streams (psana's event
builder joins them the same way); a stream without a datagram of that time stamp missed the
event. Walking the headers (a pread of 24 bytes per datagram) gives random access to any event
without reading the data, so a run can be served as independent event ranges in parallel.

No psana here: this only reads the framing, which is fixed by xtcdata's Dgram and Xtc headers.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flight_server.errors import RunUnreadable

STREAM_FILE = re.compile(r"^(?P<prefix>.+)-r(?P<run>\d{4,})-s(?P<stream>\d{3,})"
                         r"-c(?P<chunk>\d{3,})\.xtc2$")

# xtcdata: Dgram = TimeStamp (u64: seconds << 32 | ns) + env (u32, transition id in bits 24..27)
# followed by the top Xtc = src (u32) + damage (u16) + contains (u16) + extent (u32, bytes of
# the Xtc including its own 12-byte header).
HEADER = np.dtype([("time", "<u8"), ("env", "<u4"), ("src", "<u4"), ("damage", "<u2"),
                   ("contains", "<u2"), ("extent", "<u4")])
TRANSITION_BYTES = 12  # time stamp + env: what precedes the Xtc
XTC_HEADER_BYTES = 12
CONFIGURE, BEGIN_RUN, SLOW_UPDATE, L1_ACCEPT = 2, 4, 10, 12  # xtcdata's TransitionId
XTC = struct.Struct("<IHHI")  # an Xtc header: src, damage, contains (TypeId), extent
PARENT, SHAPES_DATA, SHAPES, DATA, NAMES = 0, 1, 2, 3, 4  # xtcdata's TypeId (low 12 bits)
DAMAGE_CORRUPTED = 1 << 3  # the DAQ marked the Xtc corrupted: psana does not read inside
MAX_DEPTH = 16
# xtcdata's ShapesData.hh: Alg = name[256] + version u32; NameInfo = numArrays u32 +
# detType/detName/detId [256] + Alg + segment u32; Name = Alg + name[256] + type u32 + rank u32;
# Shape = 5 x u32.
NAME_INFO_BYTES = 4 + 3 * 256 + 260 + 4
NAME_BYTES = 260 + 256 + 4 + 4
NAME_TYPE_AT = 260 + 256
SHAPE_BYTES = 5 * 4
MAX_RANK = 5
ELEMENT_BYTES = (1, 2, 4, 8, 1, 2, 4, 8, 4, 8, 1, 4, 4)  # by Name::DataType, CHARSTR = 10
READ_AHEAD = 1 << 20  # small datagrams' headers are read through a 1 MiB window, many per read
LARGE = 64 << 10  # after a datagram this large, the next header alone is read: a detector
# frame's bytes are never read to find the events (on a parallel file system, a cold read)


@dataclass(frozen=True)
class StreamFiles:
    stream: int
    chunks: tuple[Path, ...]  # c000, c001, ... in order


def run_files(first: Path) -> dict[tuple[int, int], Path]:
    """(stream, chunk) -> file, of every file of the run `first` (any of its files) is part of."""
    match = STREAM_FILE.match(first.name)
    if match is None:
        raise RunUnreadable(f"{first.name} is not named like an xtc2 run file "
                            "(<experiment>-r<RUN>-s<STREAM>-c<CHUNK>.xtc2)")
    prefix, number = match["prefix"], int(match["run"])
    found = {}
    for entry in os.scandir(first.parent):
        m = STREAM_FILE.match(entry.name)
        if m and m["prefix"] == prefix and int(m["run"]) == number:
            found[(int(m["stream"]), int(m["chunk"]))] = Path(entry.path)
    return dict(sorted(found.items()))


def run_streams(first: Path) -> list[StreamFiles]:
    """Every stream of the run that `first` (any of its files) is part of, with its chunks.
    A chunk missing between two others is an error: events after it would be lost silently."""
    number = int(STREAM_FILE.match(first.name)["run"]) if STREAM_FILE.match(first.name) else -1
    found: dict[int, dict[int, Path]] = {}
    for (stream, chunk), path in run_files(first).items():
        found.setdefault(stream, {})[chunk] = path
    streams = []
    for stream in sorted(found):
        chunks = found[stream]
        expected = list(range(max(chunks) + 1))
        if sorted(chunks) != expected:
            missing = [f"c{c:03d}" for c in expected if c not in chunks]
            raise RunUnreadable(
                f"run {number}: stream s{stream:03d} lacks chunk file(s) {', '.join(missing)} "
                f"(has {', '.join(f'c{c:03d}' for c in sorted(chunks))}); its events after the "
                "gap cannot be read")
        streams.append(StreamFiles(stream, tuple(chunks[c] for c in expected)))
    if not streams:
        raise RunUnreadable(f"run {number}: no stream files beside {first.name}")
    return streams


@dataclass(frozen=True)
class StreamIndex:
    """Every datagram of one stream, in file order."""

    files: StreamFiles
    time: np.ndarray  # uint64 raw time stamps
    transition: np.ndarray  # uint8 transition ids
    chunk: np.ndarray  # uint16: which chunk file
    offset: np.ndarray  # int64: byte offset in that file
    size: np.ndarray  # int64: bytes of the datagram

    def l1(self) -> np.ndarray:
        """Positions of the L1Accept (event) datagrams."""
        return np.flatnonzero(self.transition == L1_ACCEPT)


def scan_stream(files: StreamFiles) -> StreamIndex:
    """Walk the datagram headers of a stream's chunks. A datagram running past the end of its
    file (a truncated copy, a chunk still being written) or a header that cannot be one makes
    the whole run unreadable, naming the file and byte."""
    times, transitions, chunks, offsets, sizes = [], [], [], [], []
    for c, path in enumerate(files.chunks):
        with open(path, "rb") as fh:
            fd = fh.fileno()
            end = os.fstat(fd).st_size
            at, window, window_at, size = 0, b"", 0, 0
            while at < end:
                if at + HEADER.itemsize > window_at + len(window):
                    want = HEADER.itemsize if size >= LARGE else READ_AHEAD
                    window, window_at = os.pread(fd, want, at), at
                if at + HEADER.itemsize > window_at + len(window):
                    raise _truncated(path, at, "a datagram header")
                head = np.frombuffer(window, HEADER, 1, at - window_at)[0]
                extent = int(head["extent"])
                size = TRANSITION_BYTES + extent
                transition = (int(head["env"]) >> 24) & 0xF
                if extent < XTC_HEADER_BYTES:
                    raise RunUnreadable(f"{path.name}: byte {at} does not start an xtc2 datagram "
                                        f"(extent {extent}); the file is corrupted")
                if c == 0 and at == 0 and transition != CONFIGURE:
                    raise RunUnreadable(f"{path.name} does not start with a Configure "
                                        "transition: not an xtc2 run file, or corrupted")
                if at + size > end:
                    raise _truncated(path, at, f"a datagram of {size} bytes")
                times.append(int(head["time"]))
                transitions.append(transition)
                chunks.append(c)
                offsets.append(at)
                sizes.append(size)
                at += size
    return StreamIndex(files, np.array(times, np.uint64), np.array(transitions, np.uint8),
                       np.array(chunks, np.uint16), np.array(offsets, np.int64),
                       np.array(sizes, np.int64))


def _truncated(path: Path, at: int, what: str) -> RunUnreadable:
    return RunUnreadable(f"{path.name} is truncated: {what} at byte {at} runs past the end of "
                         "the file")


@dataclass(frozen=True)
class EventIndex:
    """The run's events in time order: `time[i]` and, per stream, the position in that
    stream's index of event i's datagram (-1: the stream missed the event)."""

    time: np.ndarray  # uint64
    slots: np.ndarray  # int64, (streams, events)

    def __len__(self) -> int:
        return len(self.time)


def build_events(streams: list[StreamIndex]) -> EventIndex:
    """Join the streams' L1Accepts by time stamp, as psana's event builder does."""
    l1s = [s.l1() for s in streams]
    stamps = [s.time[p] for s, p in zip(streams, l1s, strict=True)]
    times = np.unique(np.concatenate(stamps)) if stamps else np.zeros(0, np.uint64)
    slots = np.full((len(streams), len(times)), -1, dtype=np.int64)
    for k, (s, p, t) in enumerate(zip(streams, l1s, stamps, strict=True)):
        if len(np.unique(t)) != len(t):
            raise RunUnreadable(f"{s.files.chunks[0].name}: two events with the same time "
                                "stamp; the file is corrupted")
        slots[k, np.searchsorted(times, t)] = p
    return EventIndex(times, slots)


Names = dict[int, list[tuple[int, int]]]  # NamesId -> (xtc type, rank) of each name, in order


def names_of(configure: memoryview) -> Names:
    """The Names a Configure datagram declares: what each detector's data blocks hold, which a
    data block's size is checked against (see `check_datagram`)."""
    found: Names = {}
    _walk(configure, _top(configure, "Configure"), "the Configure transition", None, found)
    return found


def check_datagram(buf: memoryview, names: Names, where: str) -> None:
    """Refuse a datagram psana could not parse without reading outside it. psana (xtcdata)
    abort()s the whole process on an Xtc extent that overruns its buffer, and builds arrays
    from a data block's declared shapes without comparing them to the block's size; so every
    Xtc psana descends into must fit inside its parent, every detector data block must name
    Names the Configure declared and be as large as its shapes say, before psana sees it."""
    _walk(buf, _top(buf, where), where, names, None)


def _top(buf: memoryview, where: str) -> tuple[int, int]:
    extent = XTC.unpack_from(buf, TRANSITION_BYTES)[3]
    if extent < XTC_HEADER_BYTES or TRANSITION_BYTES + extent > len(buf):
        raise RunUnreadable(f"{where}: the datagram's extent {extent} does not fit its "
                            f"{len(buf)} bytes; the file is corrupted")
    return TRANSITION_BYTES + XTC_HEADER_BYTES, TRANSITION_BYTES + extent


def _walk(buf: memoryview, span: tuple[int, int], where: str, names: Names | None,
          found: Names | None, depth: int = 0) -> None:
    at, end = span
    while at < end:
        if at + XTC_HEADER_BYTES > end or depth > MAX_DEPTH:
            raise _corrupt(where, at)
        src, damage, contains, extent = XTC.unpack_from(buf, at)
        if extent < XTC_HEADER_BYTES or at + extent > end:
            raise _corrupt(where, at)
        kind, inner = contains & 0xFFF, (at + XTC_HEADER_BYTES, at + extent)
        if not damage & DAMAGE_CORRUPTED:  # psana skips what the DAQ marked corrupted
            if kind == PARENT:
                _walk(buf, inner, where, names, found, depth + 1)
            elif kind == NAMES and found is not None:
                found[src] = _names(buf, inner, where)
            elif kind == SHAPES_DATA and names is not None:
                _check_block(buf, inner, names.get(src), where)
        at += extent


def _names(buf: memoryview, span: tuple[int, int], where: str) -> list[tuple[int, int]]:
    start, end = span[0] + NAME_INFO_BYTES, span[1]
    if start > end or (end - start) % NAME_BYTES:
        raise _corrupt(where, span[0])
    out = []
    for at in range(start, end, NAME_BYTES):
        kind, rank = struct.unpack_from("<II", buf, at + NAME_TYPE_AT)
        if kind >= len(ELEMENT_BYTES) or rank >= MAX_RANK:
            raise RunUnreadable(f"{where}: a Name declares type {kind}, rank {rank}; the file "
                                "is corrupted")
        out.append((kind, rank))
    return out


def _check_block(buf: memoryview, span: tuple[int, int], declared: list | None,
                 where: str) -> None:
    """A ShapesData: its Shapes (one per array name) and its Data, first two in either order
    (psana abort()s otherwise), the Data large enough for what the shapes say."""
    if declared is None:
        raise RunUnreadable(f"{where}: a detector data block refers to Names the Configure "
                            "transition did not declare; the file is corrupted")
    kinds, spans = [], []
    at, end = span
    while at < end and len(kinds) < 2:
        if at + XTC_HEADER_BYTES > end:
            raise _corrupt(where, at)
        _, _, contains, extent = XTC.unpack_from(buf, at)
        if extent < XTC_HEADER_BYTES or at + extent > end:
            raise _corrupt(where, at)
        kinds.append(contains & 0xFFF)
        spans.append((at + XTC_HEADER_BYTES, at + extent))
        at += extent
    arrays = sum(1 for _, rank in declared if rank)
    parts = dict(zip(kinds, spans, strict=True))
    shapes = parts.get(SHAPES, (0, 0))
    data = parts.get(DATA)
    layout_ok = sorted(kinds) == [SHAPES, DATA] or (kinds[:1] == [DATA] and not arrays)
    if not layout_ok or data is None or shapes[1] - shapes[0] < arrays * SHAPE_BYTES:
        raise RunUnreadable(f"{where}: a detector data block lacks its shapes or data; the "
                            "file is corrupted")
    need, k = 0, 0
    for kind, rank in declared:
        count = 1
        if rank:
            dims = struct.unpack_from(f"<{rank}I", buf, shapes[0] + k * SHAPE_BYTES)
            k += 1
            for d in dims:
                count *= d
        need += count * ELEMENT_BYTES[kind]
    if need > data[1] - data[0] or need >= 1 << 32:  # psana sizes blocks in 32 bits
        raise RunUnreadable(f"{where}: a detector's shapes need {need} bytes, its data block "
                            f"holds {data[1] - data[0]}; the file is corrupted")


def _corrupt(where: str, at: int) -> RunUnreadable:
    return RunUnreadable(f"{where}: the xtc structure at byte {at} of the datagram overruns "
                         "it; the file is corrupted")
