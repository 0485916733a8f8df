"""The job table: every job, its owner, state, progress and every transition, in a database that
survives the server. One server keeps it in SQLite (WAL mode, in the state directory:
`LocalJobStore`); a cluster's nodes share it in PostgreSQL (`jobs/shared_store.py`). The
statements are plain SQL that both run; a backend supplies the connection and its locking.

Every change is one transaction, committed with a full sync before the call that made it
returns: a job acknowledged to its submitter is on disk, and so is each transition. Checks that
must not race (an idempotency key seen twice, the per-user limit, a state two nodes change at
once) run inside the transaction that writes, which excludes every other writer.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flight_server.errors import InvalidArgument
from schemas.jobs import FINAL, QUEUED, RUNNING, STATES, TRANSITIONS, JobSpec, spec_from_json

log = logging.getLogger(__name__)

Owner = tuple[str, str]  # (subject, issuer): who submitted, as their token says

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner_sub TEXT NOT NULL,
    owner_iss TEXT NOT NULL,
    key TEXT,
    spec TEXT NOT NULL,
    into_experiment TEXT NOT NULL,
    into_stream TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    run INTEGER,
    events INTEGER NOT NULL DEFAULT 0,
    events_total INTEGER,
    bytes INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancelled_by TEXT,
    credentials BLOB,
    node TEXT,
    UNIQUE (owner_sub, owner_iss, key)
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner_sub, owner_iss, created);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_stream ON jobs (into_experiment, into_stream);
CREATE TABLE IF NOT EXISTS transitions (
    job TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job, seq)
);
"""


class InvalidTransition(ValueError):
    """A state change the job's state does not allow (a bug in the caller, not bad input)."""


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Job:
    id: str
    owner: Owner
    spec: JobSpec
    state: str
    created: float
    started: float | None
    finished: float | None
    error: str | None
    run: int | None
    events: int
    events_total: int | None
    bytes: int
    attempt: int  # how many times it has started: a restart or a lost scheduler starts it again
    cancel_requested: bool
    node: str | None  # in a cluster: the node that runs it, or ran it last
    transitions: tuple[tuple[str, float, str], ...]  # (state, at, reason)

    def status(self) -> dict[str, Any]:
        """The `job` action's answer."""
        return {
            "job": self.id, "owner": self.owner[0], "state": self.state, "attempt": self.attempt,
            "created": _iso(self.created), "started": _iso(self.started),
            "finished": _iso(self.finished),
            "progress": {"events": self.events, "events_total": self.events_total,
                         "bytes": self.bytes},
            "error": self.error,
            "into": {"experiment": self.spec.experiment, "stream": self.spec.stream},
            "end_run": self.spec.end_run, "run": self.run,
            "from": None if self.spec.origin is None else self.spec.origin.location,
            "node": self.node, "cancel_requested": self.cancel_requested,
            "transitions": [{"state": s, "at": _iso(at), "reason": why}
                            for s, at, why in self.transitions],
        }


class JobStore:
    """The job table's logic over a backend's connection: `_transaction()` yields something
    with `execute(sql, args)` (sqlite3's `?` placeholders) whose cursor has fetchone/fetchall,
    and excludes every other writer until it ends; `_snapshot()` the same for reading, one
    consistent view that waits for no writer (status polls and scrapes do not queue behind
    submits)."""

    for_update = ""  # what a backend adds to a SELECT of rows the transaction then changes

    def __init__(self) -> None:
        # Called with each job that reaches a final state, after its transaction (the metrics'
        # job durations); a failure there is the observer's, never the transition's.
        self.on_final: Callable[[Job], None] | None = None

    def close(self) -> None:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _snapshot(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    # -- writing -----------------------------------------------------------------------------

    def submit(self, owner: Owner, spec: JobSpec, limit: int,
               credentials: Callable[[str], bytes] | None = None) -> tuple[Job, bool]:
        """(the job, True) once queued; (the job first submitted, False) when the owner used the
        same key before. Refuses a job past the owner's `limit` of queued plus running jobs.
        `credentials(job_id)` seals what the job needs from its submitter (a mirror's token for
        the other site); kept until the job ends."""
        with self._transaction() as con:
            if spec.key is not None:
                row = con.execute("SELECT id FROM jobs WHERE owner_sub = ? AND owner_iss = ? "
                                  "AND key = ?", (*owner, spec.key)).fetchone()
                if row is not None:
                    return self._load(con, row[0]), False
            active = con.execute(
                "SELECT count(*) FROM jobs WHERE owner_sub = ? AND owner_iss = ? "
                "AND state IN (?, ?)", (*owner, QUEUED, RUNNING)).fetchone()[0]
            if active >= limit:
                raise InvalidArgument(
                    f"you have {active} jobs queued or running, the most this server takes per "
                    f"user ({limit}); wait for one to finish or cancel one")
            busy = con.execute(
                "SELECT id, state FROM jobs WHERE into_experiment = ? AND into_stream = ? "
                "AND state IN (?, ?)", (spec.experiment, spec.stream, QUEUED, RUNNING)).fetchone()
            if busy is not None:
                raise InvalidArgument(
                    f"stream '{spec.stream}' of '{spec.experiment}' is where job {busy[0]} "
                    f"({busy[1]}) puts its results; two jobs in one stream would mix their "
                    "events: name another stream")
            job_id, now = uuid.uuid4().hex, time.time()
            con.execute("INSERT INTO jobs (id, owner_sub, owner_iss, key, spec, into_experiment, "
                        "into_stream, state, created, credentials) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, *owner, spec.key, spec.encode().decode(), spec.experiment,
                         spec.stream, QUEUED, now,
                         None if credentials is None else credentials(job_id)))
            self._record(con, job_id, QUEUED, now, "submitted")
            return self._load(con, job_id), True

    def transition(self, job_id: str, state: str, reason: str, *, error: str | None = None,
                   run: int | None = None, events: int | None = None,
                   events_total: int | None = None, node: str | None = None,
                   expect: str | None = None, expect_node: str | None = None) -> Job:
        """Move the job to `state`, recording when and why; InvalidTransition when its state
        does not allow it (a job that has finished stays finished), or when it is not in state
        `expect` on node `expect_node` (where given): another node changed it first. `node`:
        who runs it from now on. A job that ends drops its credentials in the same
        transaction."""
        if state not in STATES:
            raise InvalidTransition(f"unknown state {state!r}")
        with self._transaction() as con:
            current = con.execute("SELECT state, node FROM jobs WHERE id = ?" + self.for_update,
                                  (job_id,)).fetchone()
            if current is None:
                raise KeyError(job_id)
            if state not in TRANSITIONS[current[0]]:
                raise InvalidTransition(f"job {job_id} is {current[0]}; it cannot become {state}")
            if (expect is not None and current[0] != expect) or (
                    expect_node is not None and current[1] != expect_node):
                raise InvalidTransition(f"job {job_id} is {current[0]} on {current[1]} now")
            now = time.time()
            con.execute(
                "UPDATE jobs SET state = ?, error = coalesce(?, error), run = coalesce(?, run), "
                "node = coalesce(?, node), "
                "attempt = attempt + CASE WHEN ? = ? THEN 1 ELSE 0 END, "
                "events = coalesce(?, events), "
                "events_total = coalesce(?, events_total), "
                "started = CASE WHEN ? = ? AND started IS NULL THEN ? ELSE started END, "
                "finished = CASE WHEN ? THEN ? ELSE finished END, "
                "credentials = CASE WHEN ? THEN NULL ELSE credentials END WHERE id = ?",
                (state, error, run, node, state, RUNNING, events, events_total, state, RUNNING,
                 now,
                 state in FINAL, now, state in FINAL, job_id))
            self._record(con, job_id, state, now, reason)
            job = self._load(con, job_id)
        if state in FINAL and self.on_final is not None:
            try:
                self.on_final(job)
            except Exception:
                log.exception("jobs: the observer of job %s's end failed", job_id)
        return job

    def progress(self, job_id: str, events: int, nbytes: int,
                 events_total: int | None = None) -> None:
        with self._transaction() as con:
            con.execute("UPDATE jobs SET events = ?, bytes = ?, "
                        "events_total = coalesce(?, events_total) WHERE id = ?",
                        (events, nbytes, events_total, job_id))

    def request_cancel(self, job_id: str, who: str) -> None:
        """Remember that `who` cancelled: a job a restart interrupted is then not resumed, and
        in a cluster, the node that runs it stops it."""
        with self._transaction() as con:
            con.execute("UPDATE jobs SET cancel_requested = 1, "
                        "cancelled_by = coalesce(cancelled_by, ?) WHERE id = ?", (who, job_id))

    def cancels_for(self, node: str) -> list[tuple[str, str]]:
        """(job, who cancelled it) of the jobs running on `node` whose cancel was asked for."""
        with self._snapshot() as con:
            return [tuple(r) for r in con.execute(
                "SELECT id, coalesce(cancelled_by, 'its owner') FROM jobs WHERE state = ? "
                "AND node = ? AND cancel_requested = 1", (RUNNING, node)).fetchall()]

    def orphans(self, node: str, timeout_s: float) -> list[Job]:
        """Running jobs no live node runs: one server has none (its restart recovers its jobs
        at start); a cluster's store names those of nodes silent for `timeout_s`."""
        return []

    @staticmethod
    def _record(con: Any, job_id: str, state: str, at: float,
                reason: str) -> None:
        seq = con.execute("SELECT coalesce(max(seq), -1) + 1 FROM transitions WHERE job = ?",
                          (job_id,)).fetchone()[0]
        con.execute("INSERT INTO transitions (job, seq, state, at, reason) VALUES (?, ?, ?, ?, ?)",
                    (job_id, seq, state, at, reason[:1000]))

    # -- reading -----------------------------------------------------------------------------

    def get(self, job_id: str, owner: Owner | None) -> Job | None:
        """The job, if it exists and `owner` may see it (None: an admin, who sees all); another
        user's job is None, as one that does not exist."""
        with self._snapshot() as con:
            job = self._load(con, job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def jobs(self, owner: Owner | None, state: str | None = None,
             limit: int = 100) -> list[Job]:
        """The owner's jobs (all jobs for None), newest first."""
        where, args = [], []
        if owner is not None:
            where.append("owner_sub = ? AND owner_iss = ?")
            args += list(owner)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = "SELECT id FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created DESC, rowid DESC LIMIT ?"
        with self._snapshot() as con:
            ids = [r[0] for r in con.execute(sql, (*args, limit)).fetchall()]
            return [self._load(con, i) for i in ids]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (every state, 0 included)."""
        with self._snapshot() as con:
            rows = con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def credentials(self, job_id: str) -> bytes | None:
        """A running mirror's sealed credentials (None once the job has ended)."""
        with self._snapshot() as con:
            row = con.execute("SELECT credentials FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def in_state(self, state: str, limit: int = -1) -> list[Job]:
        """The jobs in `state`, oldest first, at most `limit` (-1: all): at start, the running
        jobs a restart interrupted; then the head of the queue."""
        sql = "SELECT id FROM jobs WHERE state = ? ORDER BY created, rowid"
        with self._snapshot() as con:
            if limit >= 0:
                ids = [r[0] for r in con.execute(sql + " LIMIT ?", (state, limit)).fetchall()]
            else:
                ids = [r[0] for r in con.execute(sql, (state,)).fetchall()]
            return [self._load(con, i) for i in ids]

    @staticmethod
    def _load(con: Any, job_id: str) -> Job | None:
        row = con.execute(
            "SELECT owner_sub, owner_iss, spec, state, created, started, finished, error, run, "
            "events, events_total, bytes, attempt, cancel_requested, node FROM jobs "
            "WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        steps = con.execute("SELECT state, at, reason FROM transitions WHERE job = ? "
                            "ORDER BY seq", (job_id,)).fetchall()
        return Job(job_id, (row[0], row[1]), _spec(row[2]), *row[3:13], bool(row[13]),
                   row[14], tuple(map(tuple, steps)))


def _spec(text: str) -> JobSpec:
    return spec_from_json(json.loads(text))


class LocalJobStore(JobStore):
    """One server's job table: SQLite in WAL mode, each commit synced before it returns."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, one transaction at a time
        self._con = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode = WAL")
        self._con.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
        self._con.execute("PRAGMA foreign_keys = ON")
        # A mirror's sealed credentials are overwritten, not just unlinked, when dropped.
        self._con.execute("PRAGMA secure_delete = ON")
        self._con.executescript(SCHEMA)
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("credentials", "BLOB"), ("cancelled_by", "TEXT"),
                             ("node", "TEXT")):
            if column not in columns:  # a table from an earlier version
                self._con.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                yield self._con
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        with self._lock:  # the one connection: no write of this process comes in between
            yield self._con
