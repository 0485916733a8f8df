"""Every live stream under the data root, found on disk at start and recovered from its log.

A stream lives in DATA/<experiment>/live/<stream>/: `segments/` (the log), `groups/` (consumer
group commits), `stream.json` (retention, and the run it became) and, once ended, the run file
the catalog serves like any other. One flusher thread syncs every stream's log: each
`fsync_interval` (policy "interval"), or as soon as a batch arrives, everything that arrived
meanwhile in one go (policy "batch": a group commit); it also applies retention.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.catalog import EXPERIMENT_NAME
from flight_server.config import LiveSettings
from flight_server.errors import InvalidArgument, NotFound, close_matches, listing
from flight_server.live.stream import AckSession, Stream
from schemas.json_input import excerpt
from schemas.live import LIVE_SEGMENT, owner_message

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 1.0


class Elsewhere(flight.FlightUnavailableError):
    """Another node of the cluster owns the live stream: the message names it, and clients
    follow (schemas/live.py `owner_named_in`)."""


def check_stream_name(name: str) -> None:
    if not EXPERIMENT_NAME.match(name) or ".." in name:
        raise InvalidArgument(f"invalid stream name {excerpt(name)}: use letters, digits, '_', "
                              "'-' and '.', starting with a letter or digit")


class LiveStreams:
    def __init__(self, root: Path, settings: LiveSettings,
                 owner: Callable[[str, str], str | None] | None = None) -> None:
        """`owner(experiment, stream)`: in a cluster, None if this node owns the stream (it
        claims one nobody living owns), else the owner's location. A cluster node opens a
        stream found on disk only once it owns it, never at start."""
        self.root = Path(root)
        self.owner = owner
        self.settings = settings
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], Stream] = {}
        self._wake = threading.Event()  # "batch" policy: an append asks for a sync at once
        self._stop = False
        for directory in sorted(self.root.glob(f"*/{LIVE_SEGMENT}/*/")) if owner is None else []:
            experiment, name = directory.parent.parent.name, directory.name
            if EXPERIMENT_NAME.match(experiment) and EXPERIMENT_NAME.match(name):
                stream = Stream(experiment, name, directory, settings, self._wake.set)
                self._streams[(experiment, name)] = stream
                log.info("live stream %s/%s: %d events recovered", experiment, name,
                         stream.log.end)
        self._flusher = threading.Thread(target=self._flush_loop, name="live-flusher",
                                         daemon=True)
        self._flusher.start()

    def directory(self, experiment: str, name: str) -> Path:
        return self.root / experiment / LIVE_SEGMENT / name

    def get(self, experiment: str, name: str) -> Stream:
        with self._lock:
            stream = self._streams.get((experiment, name)) or self._taken(experiment, name)
            if stream is None:
                names = [n for (e, n) in self._streams if e == experiment]
                raise NotFound(f"experiment '{experiment}' has no live stream '{name}'."
                               f"{close_matches(name, names)} Streams: {listing(names)}")
            return stream

    def find(self, experiment: str, name: str) -> Stream | None:
        """The stream, or None: for callers to whom a missing stream is no error."""
        with self._lock:
            return self._streams.get((experiment, name)) or self._taken(experiment, name)

    def claim(self, experiment: str, name: str) -> str | None:
        """None once this node owns the stream (claimed if no living node does), else the
        owner's location. One server owns every stream. StateUnavailable without the state."""
        return None if self.owner is None else self.owner(experiment, name)

    def _taken(self, experiment: str, name: str, create: bool = False) -> Stream | None:
        """A cluster node's stream it has not opened yet: opened from disk (or created) once
        this node owns it; Elsewhere when another node does. Under the registry's lock."""
        if self.owner is None or not EXPERIMENT_NAME.match(name) or ".." in name:
            return None
        directory = self.directory(experiment, name)
        if not create and not directory.is_dir():
            return None
        elsewhere = self.owner(experiment, name)
        if elsewhere is not None:
            raise Elsewhere(owner_message(experiment, name, elsewhere))
        stream = Stream(experiment, name, directory, self.settings, self._wake.set)
        self._streams[(experiment, name)] = stream
        log.info("live stream %s/%s: this node owns it now (%d events on disk)", experiment,
                 name, stream.log.end)
        return stream

    def attach(self, experiment: str, name: str, schema: pa.Schema,
               session: AckSession) -> Stream:
        """A producer joins the stream, which is created if it does not exist yet (a producer's
        first DoPut). Under the registry's lock, so that `discard_unused` never removes a
        stream a producer is joining."""
        check_stream_name(name)
        with self._lock:
            stream = self._streams.get((experiment, name))
            if stream is None and self.owner is not None:
                stream = self._taken(experiment, name, create=True)
            if stream is None:
                stream = Stream(experiment, name, self.directory(experiment, name),
                                self.settings, self._wake.set)
                self._streams[(experiment, name)] = stream
            stream.attach(schema, session)
            return stream

    def discard_unused(self, stream: Stream) -> None:
        """Forget a stream that never stored anything (its producer was refused), so that a
        refused DoPut leaves nothing behind: not in listings, not on disk."""
        with self._lock:
            if not stream.unused() or self._streams.get(stream.key) is not stream:
                return
            del self._streams[stream.key]
        stream.close()
        if not any(p.is_file() for p in stream.directory.rglob("*")):
            shutil.rmtree(stream.directory, ignore_errors=True)

    def release_all(self) -> None:
        """A cluster node that may have lost its streams to another: sync and close every one
        it holds; their live calls end (clients come back and are told who owns it now)."""
        with self._lock:
            held = list(self._streams.values())
            self._streams.clear()
        for stream in held:
            try:
                stream.sync()  # what was acknowledged is on disk for the next owner
            finally:
                stream.stop()
        threading.Thread(target=self._close_when_idle, args=(held,), daemon=True,
                         name="live-release").start()
        log.info("live: let go of %d streams", len(held))

    @staticmethod
    def _close_when_idle(streams: list[Stream], patience: float = 30.0) -> None:
        """Close released streams once their calls have ended (a read in progress must not
        meet a closed file)."""
        deadline = time.monotonic() + patience
        for stream in streams:
            while (stream.sessions or stream.consumers) and time.monotonic() < deadline:
                time.sleep(0.05)
            stream.close()

    def streams(self) -> list[Stream]:
        with self._lock:
            return list(self._streams.values())

    def _flush_loop(self) -> None:
        last_retention = 0.0
        interval = self.settings.fsync_interval if self.settings.fsync == "interval" else \
            RETENTION_EVERY_S
        while not self._stop:
            self._wake.wait(interval)
            self._wake.clear()
            for stream in self.streams():
                try:
                    stream.sync()  # nothing to do for a stream with nothing new
                    if time.monotonic() - last_retention >= RETENTION_EVERY_S:
                        stream.apply_retention()
                except Exception:  # one stream's disk trouble must not stop the others' syncs
                    log.exception("live stream %s/%s: sync failed", stream.experiment,
                                  stream.name)
            if time.monotonic() - last_retention >= RETENTION_EVERY_S:
                last_retention = time.monotonic()

    def stop(self) -> None:
        for stream in self.streams():
            stream.sync()  # acks first: what was acknowledged need not be resent
            stream.stop()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._flusher.join()
        for stream in self.streams():
            stream.sync()
            stream.close()
