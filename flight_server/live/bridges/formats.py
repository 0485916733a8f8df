"""What every bridge format implements: one ZMQ message (its parts) in, rows out.

A format is stateful where its protocol is (DECTRIS's start message announces what the image
messages that follow hold); `Bridge` (bridge.py) owns the socket, the bounded queue, batching
and the producer, so a format only decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa


class BadMessage(ValueError):
    """A message that is not what the format announces (truncated, wrong type, a header that
    contradicts its data). The bridge counts it, logs why, and goes on with the next one."""


@dataclass
class Decoded:
    """What one message carried: rows (None for a control message), schema metadata the stream
    should carry (a series' start message: detector geometry, ...), and whether it ended a
    series."""

    batch: pa.RecordBatch | None = None
    metadata: dict[str, str] | None = None
    end: bool = False


class Format(Protocol):
    name: str  # as `lclstream bridge FORMAT` names it
    socket_type: str  # the ZMQ socket the bridge opens by default: "PULL", "SUB" or "REQ"

    def decode(self, parts: list[bytes | memoryview]) -> Decoded:
        """Decode one multipart message; raise BadMessage if it is not this format."""
        ...

    def request(self) -> bytes | None:
        """For REQ sockets: what to send to ask for the next message (else None)."""
        ...
