"""Compression on the wire: Arrow IPC buffer compression (zstd or LZ4 frame), which every Arrow
client decompresses by itself, chosen per request or by the server's default.

The server's default (`compression` setting, `--compression`) is "auto": off for a peer on
loopback, where compressing costs more CPU than the bytes it saves, and zstd for any other
peer, where a wide-area link is the bottleneck. A request may ask for "zstd", "lz4" (with a
level) or "none" whatever the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.errors import InvalidArgument
from schemas import RequestError, resume
from schemas.request import compression_choice

CODECS = ("zstd", "lz4")
OFF = ("none", "off")
AUTO = "auto"


@dataclass(frozen=True)
class Compression:
    codec: str | None = None  # None: off
    level: int | None = None  # None: the codec's default

    @property
    def label(self) -> str:
        """What FlightInfo reports: "none", "zstd" or "zstd:5"."""
        if self.codec is None:
            return "none"
        return self.codec if self.level is None else f"{self.codec}:{self.level}"

    def ipc_options(self) -> pa.ipc.IpcWriteOptions | None:
        if self.codec is None:
            return None
        return pa.ipc.IpcWriteOptions(compression=pa.Codec(self.codec, self.level))


NONE = Compression()


def choose(codec: str, level: int | None = None) -> Compression:
    """A codec by name with an optional level, checked against what Arrow supports."""
    if codec in OFF:
        if level is not None:
            raise InvalidArgument(f"compression '{codec}' takes no level")
        return NONE
    if codec not in CODECS:
        raise InvalidArgument(f"unknown compression {codec!r}: use one of "
                              f"{', '.join(CODECS)} or 'none'")
    if level is not None:
        low, high = pa.Codec.minimum_compression_level(codec), \
            pa.Codec.maximum_compression_level(codec)
        if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
            raise InvalidArgument(f"{codec} compression level must be an integer from {low} "
                                  f"to {high}, got {level!r}")
    return Compression(codec, level)


def parse_setting(text: str) -> Compression | str:
    """The server setting: "auto", "none"/"off", "zstd", "lz4" or "zstd:LEVEL"."""
    text = str(text).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        codec, level = compression_choice(text)
    except RequestError as exc:
        raise InvalidArgument(str(exc)) from None
    return choose(codec, level)


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is on this
    machine. gRPC percent-encodes the peer's address ("ipv6:%5B::1%5D:5000"): decoded first."""
    peer = unquote(peer)
    if peer.startswith("unix:"):
        return True
    if peer.startswith("ipv4:"):
        return peer[5:].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[5:].rpartition(":")[0].strip("[]")
        return host in ("::1", "0:0:0:0:0:0:0:1") or host.startswith("::ffff:127.")
    return False


def resolve(codec: str | None, level: int | None, default: Compression | str,
            peer: str) -> Compression:
    """What a stream to `peer` uses: the request's choice, else the server's default."""
    if codec is not None:
        return choose(codec, level)
    if default == AUTO:
        return NONE if is_loopback(peer) else Compression("zstd")
    return default


def off_the_gil(schema: pa.Schema, batches: Iterator[tuple[pa.RecordBatch, bytes]],
                options: pa.ipc.IpcWriteOptions) -> Iterator[Any]:
    """A resumable stream's (batch, progress) pairs, for a GeneratorStream that compresses.

    pyarrow serializes (and so compresses) a batch yielded to a GeneratorStream while holding
    the GIL: every stream of the server compresses on one core, which holds zstd through a
    1 Gbit/s link well below what its ratio allows. A RecordBatchStream yielded instead is
    serialized by Arrow without the GIL, on the gRPC thread of its call, in parallel with the
    other calls. It cannot carry app_metadata, so each batch's progress goes just before it,
    announced in a zero-row batch (schemas/resume.py)."""
    marker = pa.RecordBatch.from_pylist([], schema)
    for batch, progress in batches:
        yield marker, resume.announce(resume.read_progress(progress))
        yield flight.RecordBatchStream(pa.Table.from_batches([batch], schema), options)
