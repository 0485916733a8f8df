"""What the commands share: the default server, event slices, brief error messages."""

from __future__ import annotations

import argparse
import os

DEFAULT_SERVER = os.environ.get("LCLSTREAM_SERVER", "grpc://127.0.0.1:8815")


def event_slice(text: str | None) -> slice | None:
    """'START:STOP[:STEP]', or one event number."""
    if not text:
        return None
    parts = [int(p) if p else None for p in text.split(":")]
    if not 1 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError("events must be START:STOP[:STEP]")
    return slice(*parts) if len(parts) > 1 else slice(parts[0], parts[0] + 1)


def brief(exc: BaseException) -> str:
    """The message without pyarrow's transport detail."""
    return str(exc).split(". Detail:", 1)[0].split(". gRPC client debug context", 1)[0]
