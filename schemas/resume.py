"""Resuming a DoGet that broke off: each batch of an archived run carries, as its Flight
app_metadata, the first event of the ticket's range that no batch so far covered (or, for a
compressed stream, a zero-row batch before it announces that event); a client that
lost the connection asks again with a resume ticket, the original sealed ticket and that event,
and gets the rest of the range, every event exactly once. The server re-opens the seal (an
altered ticket is refused) and checks the caller's rights again, as for any ticket."""

from __future__ import annotations

import json
from typing import Any

from schemas.json_input import RequestError, loads

VERSION = 1


def progress(next_event: int) -> bytes:
    """A batch's app_metadata: the event to resume from after it."""
    return json.dumps({"next": next_event}, separators=(",", ":")).encode()


def announce(next_event: int) -> bytes:
    """The app_metadata of a zero-row batch sent just before a data batch that cannot carry its
    own (a compressed batch, which Arrow serializes outside Python): once that next data batch
    has arrived, resume from `next_event`. Until then, from where the batches before said."""
    return json.dumps({"next_after": next_event}, separators=(",", ":")).encode()


def read_progress(meta: bytes | None, key: str = "next") -> int | None:
    """The event to resume from, from a batch's app_metadata (None: the batch has none);
    `key="next_after"`: what an announcement says about the batch after it."""
    if not meta:
        return None
    try:
        doc: Any = json.loads(meta)
    except ValueError:
        return None
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def resume_ticket(sealed: bytes, next_event: int) -> bytes:
    return json.dumps({"v": VERSION, "resume": sealed.decode("ascii"), "from": next_event},
                      separators=(",", ":")).encode()


def parse_resume(raw: bytes) -> tuple[bytes, int] | None:
    """(sealed ticket, event to resume from) of a resume ticket; None for any other ticket."""
    if not raw.startswith(b'{"v":1,"resume":'):
        return None
    doc = loads(raw, "resume ticket")
    if (not isinstance(doc, dict) or set(doc) != {"v", "resume", "from"}
            or not isinstance(doc["resume"], str) or isinstance(doc["from"], bool)
            or not isinstance(doc["from"], int)):
        raise RequestError('a resume ticket is {"v": 1, "resume": TICKET, "from": EVENT}')
    return doc["resume"].encode("ascii", "replace"), doc["from"]
