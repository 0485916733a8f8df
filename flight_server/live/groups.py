"""Consumer groups: each batch of a stream goes to exactly one member; commits make it stick.

Members take batches from one shared cursor, so a faster member takes more (data-parallel
ranks stay busy whatever their speed). What a member was given stays *outstanding* until it
commits it; if it disconnects first, its outstanding batches go back to the group and are
given to the next member that asks. After a server restart the group resumes from its
commits: everything not committed is delivered again. Delivery is therefore at-least-once:
a batch processed but not committed when its member (or the server) died is seen twice.

State on disk is one small JSON file per group, replaced atomically on every commit:
the offset the group started at and the committed ranges above it (merged, so a group whose
members commit regularly keeps one range).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path

from flight_server.fsutil import atomic_write

Span = tuple[int, int]  # [start, stop) in stream offsets


def merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


class Group:
    def __init__(self, name: str, path: Path, base: int,
                 committed: list[Span] | None = None) -> None:
        self.name = name
        self.path = path
        self.base = base
        self.committed = merge(committed or [])
        # Resume: everything from base that is not committed, then what comes after.
        self.cursor = max([base] + [stop for _, stop in self.committed])
        self.redeliver: deque[Span] = deque(self._gaps(self.cursor))
        self.outstanding: dict[str, list[Span]] = {}
        self.connected: set[str] = set()

    @classmethod
    def load(cls, name: str, path: Path) -> Group | None:
        try:
            doc = json.loads(path.read_text())
            return cls(name, path, int(doc["base"]), [tuple(s) for s in doc["committed"]])
        except FileNotFoundError:
            return None

    def save(self) -> None:
        """Durable before a commit is acknowledged: a crash or a power cut leaves the old
        commits or the new, never half, and never loses one that was acknowledged."""
        atomic_write(self.path, json.dumps({"base": self.base,
                                            "committed": self.committed}).encode())

    def _gaps(self, until: int) -> list[Span]:
        gaps, at = [], self.base
        for start, stop in self.committed:
            if start > at:
                gaps.append((at, min(start, until)))
            at = max(at, stop)
        return [g for g in gaps if g[0] < g[1]]

    # -- delivery ----------------------------------------------------------------------------

    def join(self, member: str) -> None:
        """A member connects; what it was given before and did not commit comes again."""
        self.leave(member)
        self.connected.add(member)

    def take(self, member: str, batch_end: Callable[[int], int | None]) -> Span | None:
        """The next span for `member`: one given back by a member that left, else the next
        batch at the cursor. `batch_end(offset)` is the end of the batch holding `offset`,
        or None when the stream has nothing there yet."""
        if self.redeliver:
            start, stop = self.redeliver.popleft()
            end = batch_end(start)
            if end is not None and end < stop:  # one batch at a time
                self.redeliver.appendleft((end, stop))
                stop = end
        else:
            end = batch_end(self.cursor)
            if end is None:
                return None
            start, stop = self.cursor, end
            self.cursor = end
        self.outstanding.setdefault(member, []).append((start, stop))
        return start, stop

    def commit(self, member: str, upto: int) -> int:
        """Commit what `member` was given that ends at or before `upto`; returns how many
        events that was."""
        given = self.outstanding.get(member, [])
        done = [s for s in given if s[1] <= upto]
        self.outstanding[member] = [s for s in given if s[1] > upto]
        if done:
            self.committed = merge(self.committed + done)
            self.save()
        return sum(stop - start for start, stop in done)

    def leave(self, member: str) -> None:
        """A member disconnected: what it did not commit goes to the next member that asks."""
        self.connected.discard(member)
        for span in sorted(self.outstanding.pop(member, []), reverse=True):
            self.redeliver.appendleft(span)

    def finish(self, member: str) -> None:
        """The stream ended and the member has had everything: it may still be working on (and
        then commit) its last batches, so they stay its own."""
        self.connected.discard(member)

    @property
    def members(self) -> int:
        return len(self.connected)

    def watermark(self) -> int:
        """The first offset not committed: everything before it has been processed."""
        if self.committed and self.committed[0][0] <= self.base:
            return self.committed[0][1]
        return self.base

    def finished(self, end: int) -> bool:
        return self.cursor >= end and not self.redeliver
