"""A cluster's job table, in the PostgreSQL every node shares (`--state-url`): the statements of
`JobStore`, in a schema of their own (`lclstream_jobs`) in the cluster's database.

Writers exclude one another as SQLite's do: each transaction takes one advisory lock, so the
checks made inside it (the per-user limit, a stream busy with another job, a job another node
has started or stopped meanwhile) see every commit before theirs. Job writes are a few per job
and partition; one lock costs little at that rate. Reads take no lock: a read-only snapshot.
PostgreSQL commits synchronously: what a call acknowledged is on disk.

While the database is away, every call raises StateUnavailable (UNAVAILABLE to clients).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from flight_server.cluster.state import CONNECT_TIMEOUT_S, StateUnavailable, redacted
from flight_server.jobs.store import Job, JobStore
from schemas.jobs import RUNNING

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS lclstream_jobs;
CREATE TABLE IF NOT EXISTS lclstream_jobs.jobs (
    rowid BIGSERIAL,
    id TEXT PRIMARY KEY,
    owner_sub TEXT NOT NULL,
    owner_iss TEXT NOT NULL,
    key TEXT,
    spec TEXT NOT NULL,
    into_experiment TEXT NOT NULL,
    into_stream TEXT NOT NULL,
    state TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    error TEXT,
    run INTEGER,
    events BIGINT NOT NULL DEFAULT 0,
    events_total BIGINT,
    bytes BIGINT NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancelled_by TEXT,
    credentials BYTEA,
    node TEXT,
    UNIQUE (owner_sub, owner_iss, key)
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON lclstream_jobs.jobs (owner_sub, owner_iss, created);
CREATE INDEX IF NOT EXISTS jobs_by_state ON lclstream_jobs.jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_stream ON lclstream_jobs.jobs (into_experiment, into_stream);
CREATE TABLE IF NOT EXISTS lclstream_jobs.transitions (
    job TEXT NOT NULL REFERENCES lclstream_jobs.jobs (id),
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job, seq)
);
"""
# The job tables first; then where the cluster's own tables are (the default path: a schema
# named after the user, else public), for the orphans' look at the node registry.
SEARCH_PATH = '-c search_path=lclstream_jobs,"$user",public'
WRITERS_LOCK = 0x6C63_6A62  # the advisory lock every job transaction holds
SCHEMA_LOCK = 0x6C63_6A73  # held while the tables are made (nodes start together)


class _Placeholders:
    """A psycopg connection that takes the `?` placeholders the shared statements use."""

    def __init__(self, con: psycopg.Connection) -> None:
        self.con = con

    def execute(self, sql: str, args: tuple = ()) -> psycopg.Cursor:
        return self.con.execute(sql.replace("?", "%s"), args)


class SharedJobStore(JobStore):
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._lock = threading.Lock()  # one connection, one transaction at a time
        self._con: psycopg.Connection | None = None
        with self._connected() as con:
            with con.transaction():
                con.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
                con.execute(SCHEMA)

    @contextmanager
    def _connected(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            try:
                if self._con is None or self._con.closed or self._con.broken:
                    self._con = psycopg.connect(
                        self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                        options=SEARCH_PATH)
                yield self._con
            except psycopg.OperationalError as exc:
                if self._con is not None:
                    self._con.close()
                self._con = None
                raise StateUnavailable(
                    f"the job table in the cluster's state ({redacted(self.url)}) is "
                    f"unreachable: {str(exc).strip()[:200]}; try again shortly") from None

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._connected() as con, con.transaction():
            con.execute(f"SELECT pg_advisory_xact_lock({WRITERS_LOCK})")
            yield _Placeholders(con)

    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        # a job's row and its transitions as of one moment, without the writers' lock
        with self._connected() as con, con.transaction():
            con.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield _Placeholders(con)

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def orphans(self, node: str, timeout_s: float) -> list[Job]:
        """Running jobs whose node has not heartbeated for `timeout_s` (by the database's
        clock, as the node registry counts), or that ran on `node` before it lost the state
        and let them go (it no longer runs them; the caller leaves out those it does)."""
        with self._snapshot() as con:
            ids = [r[0] for r in con.execute(
                "SELECT id FROM jobs j WHERE state = ? AND (node IS NULL OR node = ? OR "
                "NOT EXISTS (SELECT 1 FROM lclstream_nodes n WHERE n.id = j.node "
                "AND now() - n.last_seen < make_interval(secs => ?))) ORDER BY created",
                (RUNNING, node, timeout_s)).fetchall()]
            return [self._load(con, i) for i in ids]
