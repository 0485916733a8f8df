"""The state nodes of a cluster share, in PostgreSQL (`--state-url postgresql://...`): which
nodes are alive (each heartbeats; one silent for `node_timeout_s` leaves every new plan), the
fingerprints of the keys every node must share (a ticket one node sealed opens on any other; a
node started with other keys is refused at start), and which node owns each live stream (the
one that may open its files; a stream whose owner stopped heartbeating goes to the next node
that claims it).

Times are the database's (`now()`), so nodes' clocks need not agree. A node keeps serving
reads while the database is away: planning uses the nodes it last saw alive; no stream changes
owner meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pyarrow.flight as flight

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS lclstream_nodes (
    id TEXT PRIMARY KEY,
    location TEXT NOT NULL,
    started TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS lclstream_streams (
    experiment TEXT NOT NULL,
    stream TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (experiment, stream)
);
CREATE TABLE IF NOT EXISTS lclstream_users (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    grants TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lclstream_keys (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    first_node TEXT NOT NULL
);
"""
CONNECT_TIMEOUT_S = 5
SCHEMA_LOCK = 0x6C63_6C73  # the advisory lock taken while the tables are made
FENCE_AT = 0.6  # of node_timeout_s without a heartbeat: the node lets go of its live streams


class ClusterError(ValueError):
    """This node cannot join the cluster as configured; the message says why and what to do."""


class StateUnavailable(flight.FlightUnavailableError):
    """A state change (a live stream's owner) cannot be made while the database is away."""


def fingerprint(secret: bytes) -> str:
    """What the state records of a key: enough to tell two keys apart, nothing to rebuild one."""
    return hashlib.sha256(b"lclstream key fingerprint\x00" + secret).hexdigest()[:32]


class ClusterState:
    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._con: psycopg.Connection | None = None

    def describe(self) -> str:
        """Where the state is, without a password."""
        return redacted(self.url)

    def _connection(self) -> psycopg.Connection:
        if self._con is None or self._con.closed or self._con.broken:
            self._con = psycopg.connect(self.url, autocommit=True,
                                        connect_timeout=CONNECT_TIMEOUT_S)
        return self._con

    def execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        """One statement, its rows; psycopg.OperationalError while the database is away."""
        with self._lock:
            try:
                cursor = self._connection().execute(sql, args)
                return cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError:
                if self._con is not None:
                    self._con.close()
                self._con = None
                raise

    def create(self) -> None:
        """The tables, once: nodes a batch system starts together must not race to make them
        (concurrent CREATE ... IF NOT EXISTS can still collide in PostgreSQL's catalog)."""
        with self._lock:
            self._connection().execute(
                f"BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT;")

    def check_keys(self, keys: dict[str, bytes], node: str) -> None:
        """Record the keys' fingerprints if no node has yet; refuse keys that differ."""
        for name, secret in sorted(keys.items()):
            mine = fingerprint(secret)
            self.execute("INSERT INTO lclstream_keys (name, fingerprint, first_node) "
                         "VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
                         (name, mine, node))
            [(theirs, first)] = self.execute(
                "SELECT fingerprint, first_node FROM lclstream_keys WHERE name = %s", (name,))
            if theirs != mine:
                raise ClusterError(
                    f"this node's {name} differs from the cluster's (fingerprint {mine[:12]}, "
                    f"the cluster's {theirs[:12]}, first recorded by node {first}): a ticket "
                    "sealed by one node must open on every other, so every node needs the same "
                    "keys; start it with the state directory the other nodes use (or a copy "
                    "of its *.key files)")

    def register(self, node: str, location: str) -> None:
        # the rows of nodes gone for a day (killed, never to leave) are of no more use
        self.execute("DELETE FROM lclstream_nodes WHERE now() - last_seen > interval '1 day'")
        self.execute("INSERT INTO lclstream_nodes (id, location) VALUES (%s, %s) "
                     "ON CONFLICT (id) DO UPDATE SET location = excluded.location, "
                     "last_seen = now()", (node, location))

    def heartbeat(self, node: str) -> None:
        self.execute("UPDATE lclstream_nodes SET last_seen = now() WHERE id = %s", (node,))

    def leave(self, node: str) -> None:
        self.execute("DELETE FROM lclstream_nodes WHERE id = %s", (node,))

    def claim_stream(self, experiment: str, stream: str, location: str,
                     timeout_s: float) -> str:
        """The location of the node that owns the live stream: `location` if it had no owner
        or its owner stopped heartbeating (then it is this node's now), else the owner's."""
        rows = self.execute(
            "INSERT INTO lclstream_streams AS s (experiment, stream, owner) "
            "VALUES (%s, %s, %s) ON CONFLICT (experiment, stream) DO UPDATE "
            "SET owner = excluded.owner WHERE s.owner = excluded.owner OR NOT EXISTS ("
            "  SELECT 1 FROM lclstream_nodes n WHERE n.location = s.owner"
            "  AND now() - n.last_seen < make_interval(secs => %s)) RETURNING owner",
            (experiment, stream, location, timeout_s))
        if rows:
            return rows[0][0]
        [(owner,)] = self.execute("SELECT owner FROM lclstream_streams WHERE experiment = %s "
                                  "AND stream = %s", (experiment, stream))
        return owner

    def live_nodes(self, timeout_s: float) -> list[tuple[str, str]]:
        """(id, location) of the nodes heard from within `timeout_s`, by id."""
        return [tuple(r) for r in self.execute(
            "SELECT id, location FROM lclstream_nodes "
            "WHERE now() - last_seen < make_interval(secs => %s) ORDER BY id", (timeout_s,))]

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None


class Node:
    """This server as a member of the cluster: registered, heartbeating, and knowing (within a
    heartbeat) which nodes are alive."""

    def __init__(self, state: ClusterState, heartbeat_s: float, timeout_s: float) -> None:
        self.state = state
        self.id = uuid.uuid4().hex[:12]
        self.location = ""
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self._alive: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state_ok = True  # whether the last heartbeat reached the database
        # Fenced: heartbeats have failed for long enough that the others may think this node
        # dead and take its live streams on; it must have let go of them first.
        self.fenced = False
        self.on_fenced: Callable[[], None] = lambda: None
        self._last_ok = time.monotonic()

    def check_keys(self, keys: dict[str, bytes]) -> None:
        """Before serving: this node's keys are the cluster's (ClusterError if not)."""
        with self._reaching():
            self.state.create()
            self.state.check_keys(keys, self.id)

    def join(self, location: str) -> None:
        """Serving at `location`: listed in plans from now on, heartbeating."""
        if "://0.0.0.0:" in location or "://[::]:" in location:
            raise ClusterError(f"this node would tell clients to connect to {location}, which "
                               "no client can reach: give its address with --advertise "
                               "grpc+tls://HOST:PORT")
        self.location = location
        self.id = f"{location}#{self.id}"
        with self._reaching():
            twins = [n for n, where in self.state.live_nodes(self.timeout_s) if where == location]
            if twins:
                raise ClusterError(f"node {twins[0]} already serves at {location}: give each "
                                   "node its own --advertise location (two nodes under one "
                                   "name would be each other's fallback)")
            self.state.register(self.id, self.location)
            self._refresh()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="cluster-heartbeat")
        self._thread.start()
        log.info("cluster: node %s joined; %d nodes alive", self.id, len(self._alive))

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise ClusterError(f"cannot reach the cluster state at {self.state.describe()}: "
                               f"{str(exc).strip()}") from None

    def _refresh(self) -> None:
        self._alive = self.state.live_nodes(self.timeout_s) or [(self.id, self.location)]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.state.heartbeat(self.id)
                self._refresh()
                if not self.state_ok:
                    log.info("cluster: the state database is back")
                self.state_ok, self.fenced = True, False
                self._last_ok = time.monotonic()
            except psycopg.Error as exc:
                if self.state_ok:
                    log.warning("cluster: the state database is away (%s); serving on with "
                                "the %d nodes last seen alive", str(exc).strip(),
                                len(self._alive))
                self.state_ok = False
                silent = time.monotonic() - self._last_ok
                if not self.fenced and silent > FENCE_AT * self.timeout_s:
                    # before the others could count this node dead: nothing of a live stream
                    # is written here from now until the state says who owns it
                    self.fenced = True
                    log.warning("cluster: no heartbeat for %.1f s; letting go of the live "
                                "streams this node holds", silent)
                    self.on_fenced()

    def owner(self, experiment: str, stream: str) -> str | None:
        """None if this node owns the live stream (claimed now if it had no living owner),
        else the owner's location. The state unreachable: StateUnavailable, since a stream
        must not get two owners."""
        try:
            if self.fenced:
                raise psycopg.OperationalError("no heartbeat has reached it lately")
            owner = self.state.claim_stream(experiment, stream, self.location, self.timeout_s)
        except psycopg.Error as exc:
            raise StateUnavailable(
                f"the cluster's state is unreachable ({str(exc).strip()[:200]}), so no node "
                f"can take live stream {experiment}/{stream} on now; try again shortly") from None
        return None if owner == self.location else owner

    def describe(self) -> dict[str, object]:
        """This node in the `health` action's answer."""
        return {"node": self.id, "location": self.location, "nodes_alive": self.alive(),
                "state_reachable": self.state_ok, "fenced": self.fenced}

    def alive(self) -> list[str]:
        """The locations of the nodes alive at the last heartbeat (this one included)."""
        return [location for _, location in self._alive]

    def leave(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.state.leave(self.id)
        except psycopg.Error as exc:
            log.info("cluster: leaving: %s", exc)
        self.state.close()


def redacted(url: str) -> str:
    """The URL without a password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.split(':')[0]}@{tail}"

