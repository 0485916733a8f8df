"""The job queue: start queued jobs on Dask (oldest first, `jobs_running` at once), follow their
tasks, record progress and every transition, cancel, and resume what a restart interrupted.

One thread makes every decision; Dask's callbacks only tell it that a task ended. A job's worker
writes through the live stream's admission check (`admit`): only the producer of the job's
current attempt, only into its stream, only while it runs. Cancelling closes that gate and
fences the stream, so nothing is stored after `cancel` returns.

In a cluster every node runs such a queue over the shared job table, on the one Dask scheduler
the nodes share. A node starts a job only once it owns the job's stream (so the gate that
admits the job's batches is its own), and claims the job in the same transaction that checks it
is still queued: a job starts once. A cancel asked of another node is recorded in the table;
the node running the job stops it within a second. A node that stops heartbeating has its
running jobs queued again by the others, to resume after what their streams hold.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.archive import planning
from flight_server.catalog import Catalog
from flight_server.cluster.state import StateUnavailable
from flight_server.config import Settings
from flight_server.errors import InvalidArgument, NotFound
from flight_server.jobs import mirror, tasks
from flight_server.jobs.engine import Engine, EngineUnavailable
from flight_server.jobs.store import InvalidTransition, Job, JobStore
from flight_server.live.service import LiveService
from flight_server.security.grants import Grants
from flight_server.security.policy import Forbidden, Identity
from flight_server.security.sealed import CredentialSeal
from flight_server.security.tokens import TokenMinter
from flight_server.sources.streaming import BatchSizing
from schemas.jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, JobSpec
from schemas.live import Subscription

log = logging.getLogger(__name__)

JOB_TOKEN_TTL_S = 7 * 24 * 3600  # a bound; the token works only while its job runs anyway
IDLE_WAKE_S = 1.0
QUEUE_LOOKAHEAD = 100  # queued jobs a cluster node looks through for those it may start
CANCEL_WAIT_S = 5.0  # beyond a node timeout: how long a cancel waits for another node to stop


class MirrorSourceError(RuntimeError):
    """The other site's server did not answer, or refused: the mirror job fails with its
    status."""


def producer_prefix(job_id: str) -> str:
    return f"job-{job_id}-"


@dataclass
class Attempt:
    """A job while it runs: its tasks and how far they got."""

    job: Job
    producer: str
    total: int | None  # source events of the whole job (None: a live stream, open-ended)
    done: int  # source events whose results are durable in the stream (partitions written)
    bytes: int
    writes: list[Any] = field(default_factory=list)  # the write tasks' futures, in order
    futures: list[Any] = field(default_factory=list)  # every future of the attempt
    settled: set[str] = field(default_factory=set)  # keys of the write tasks accounted for
    seen: int = 0  # the highest seq a worker has sent: progress within a partition
    cancelling: bool = False
    run: int | None = None  # the run its stream became, once it has

    @property
    def number(self) -> int:
        return self.job.attempt

    @property
    def progress(self) -> int:
        if self.total is None:  # a live mirror: as far as the source stream goes
            return max(self.done, self.seen)
        return max(self.done, min(self.seen, self.total))


def _describe(exc: BaseException) -> str:
    text = str(exc).split(". Detail: ", 1)[0]
    return f"{type(exc).__name__}: {text}"[:2000]


class Runner:
    def __init__(self, settings: Settings, store: JobStore, engine: Engine, catalog: Catalog,
                 live: LiveService, minter: TokenMinter | None, sizing: BatchSizing,
                 credentials: CredentialSeal) -> None:
        self.settings = settings
        self.store, self.engine, self.catalog, self.live = store, engine, catalog, live
        self.minter = minter
        self.sizing = sizing
        self.credentials = credentials
        self.data = str(settings.data.resolve())
        self.location: str | None = None
        self.node: str | None = None  # this cluster node's id (None: one server)
        self.node_timeout_s = 0.0
        self.tls_roots = self._tls_roots(settings)
        self.tls_identity = self._tls_identity(settings)
        self._lock = threading.RLock()  # the decisions: starting, settling, cancelling
        self._running: dict[str, Attempt] = {}
        self._ended: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._abandon = False  # the node lost the state: let the running jobs go
        self._thread: threading.Thread | None = None
        self.waiting: str | None = None  # why queued jobs are not starting, if they are not

    @staticmethod
    def _tls_roots(settings: Settings) -> bytes | None:
        path = settings.job_tls_roots or settings.tls_cert
        return path.read_bytes() if path is not None else None

    @staticmethod
    def _tls_identity(settings: Settings) -> tuple[bytes, bytes] | None:
        if (settings.job_tls_cert is None) != (settings.job_tls_key is None):
            raise ValueError("job_tls_cert needs job_tls_key, and the other way round")
        if settings.job_tls_cert is None:
            if settings.tls_client_ca is not None:
                log.warning("jobs: this server requires client certificates, and its workers "
                            "have none (job_tls_cert, job_tls_key): jobs will fail")
            return None
        return settings.job_tls_cert.read_bytes(), settings.job_tls_key.read_bytes()

    # -- life --------------------------------------------------------------------------------

    def start(self, server_location: str, node: str | None = None,
              node_timeout_s: float = 0.0) -> None:
        """Begin taking jobs; `server_location` is where this server listens. `node`: this
        cluster node's id; its queue then also recovers the jobs of nodes gone silent for
        `node_timeout_s`, all along rather than once at start."""
        self.location = self.settings.job_server_location or _reachable(server_location)
        self.node, self.node_timeout_s = node, node_timeout_s
        if node is None:
            self._recover()
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop deciding. Running jobs stay `running` in the table: the next start resumes them
        (a planned stop and a crash look the same, and are handled the same)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._running.clear()  # their workers' writes are refused from now on

    def wake(self) -> None:
        self._wake.set()

    def _recover(self) -> None:
        """Jobs the last server left running: cancelled if their owner asked, else queued
        again, to resume after the events their stream holds."""
        for job in self.store.in_state(RUNNING):
            self._requeue(job, "the server restarted")

    def _requeue(self, job: Job, why: str, expect_node: str | None = None) -> None:
        if job.cancel_requested:
            self.store.transition(job.id, CANCELLED, f"cancelled: {why} while the job was "
                                  "being cancelled", expect=RUNNING, expect_node=expect_node)
            return
        done = max(job.events, self._stream_holds(job) or 0)
        self.store.transition(job.id, QUEUED, f"{why}; the job resumes after the {done} source "
                              "events its stream holds", expect=RUNNING,
                              expect_node=expect_node)

    def _stream_holds(self, job: Job) -> int | None:
        """How far the job's stream holds its results; None where another node owns the
        stream (the job's progress in the table says, then)."""
        try:
            if self.live.claim(job.spec.experiment, job.spec.stream) is not None:
                return None
        except StateUnavailable:
            return None
        return self._resume_at(job)

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(IDLE_WAKE_S)
            self._wake.clear()
            try:
                if self._abandon:
                    self._abandon_all()
                while True:
                    try:
                        ended = self._ended.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        self._settle(*ended)
                    except StateUnavailable:
                        self._ended.put(ended)  # recorded once the state is back
                        raise
                if self.node is not None:
                    self._cluster_duties()
                self._start_queued()
            except StateUnavailable as exc:
                self.waiting = str(exc)
                log.warning("jobs: %s", exc)
            except Exception:  # a bug here must not stop the queue for everyone
                log.exception("jobs: the queue loop failed; it goes on")

    def _cluster_duties(self) -> None:
        """Stop the jobs here that another node was asked to cancel; queue again the jobs of
        nodes gone silent (and those this node let go of when it lost the state)."""
        with self._lock:
            for job_id, who in self.store.cancels_for(self.node):
                if job_id in self._running:
                    self._cancel_running(job_id, who)
            for job in self.store.orphans(self.node, self.node_timeout_s):
                if job.id in self._running:
                    continue
                gone = ("this node lost the cluster's state" if job.node == self.node else
                        f"node {job.node} stopped heartbeating")
                try:
                    self._requeue(job, gone, expect_node=job.node)
                except InvalidTransition:
                    pass  # another node got there first
                else:
                    log.info("job %s: %s; queued again", job.id, gone)

    # -- starting ----------------------------------------------------------------------------

    def _start_queued(self) -> None:
        with self._lock:
            room = self.settings.jobs_running - len(self._running)
            if room <= 0:
                return
            # one server starts the oldest; a cluster node those whose streams it may own
            queued = self.store.in_state(QUEUED, room if self.node is None else QUEUE_LOOKAHEAD)
            if not queued:
                self.waiting = None
                return
            try:
                client = self.engine.client()
            except EngineUnavailable as exc:
                self.waiting = str(exc)
                return
            self.waiting = None
            for job in queued:
                if room <= 0:
                    break
                if job.cancel_requested:
                    self._settle_cancelled(job)
                    continue
                if self.live.claim(job.spec.experiment, job.spec.stream) is not None:
                    continue  # its stream's owner starts it
                room -= 1
                try:
                    self._launch(client, job)
                except InvalidTransition:  # another node started or cancelled it first
                    self._running.pop(job.id, None)
                except StateUnavailable:  # no failure of the job's: it waits for the state
                    raise
                except (InvalidArgument, NotFound, MirrorSourceError, flight.FlightError,
                        pa.ArrowException, OSError) as exc:
                    attempt = self._running.pop(job.id, None)
                    expect = QUEUED if attempt is None else RUNNING
                    try:
                        self.store.transition(job.id, FAILED, "it could not start",
                                              error=_describe(exc), expect=expect,
                                              expect_node=None if attempt is None else self.node)
                    except InvalidTransition:
                        pass  # cancelled meanwhile, or another node's now

    def _settle_cancelled(self, job: Job) -> None:
        try:
            self.store.transition(job.id, CANCELLED, "cancelled before it started",
                                  expect=QUEUED)
        except InvalidTransition:
            pass  # another node settled it

    def _resume_at(self, job: Job) -> int:
        """Source events done: as far as the stream holds the job's results (or the table
        says, whichever is further: retention may have dropped the stream's start)."""
        spec = job.spec
        prefix = producer_prefix(job.id)
        last = self.live.last_seq(spec.experiment, spec.stream, lambda p: p.startswith(prefix))
        return max(job.events, last or 0)

    def _launch(self, client: Any, job: Job) -> None:
        spec = job.spec
        if spec.origin is not None:
            self._launch_mirror(client, job)
            return
        plan = planning.plan(spec.source, self.catalog, self.settings.job_partition_bytes,
                             event_budget=self.sizing.event_budget)
        self.live.check_into(spec.experiment, spec.stream, plan.schema)
        total = sum(p.records for p in plan.partitions)
        done = self._resume_at(job)
        parts = list(self._parts(plan, done))
        why = (f"started on {self.engine.describe()}: {len(parts)} tasks" if done == 0 else
               f"resumed after {done} of {total} source events: {len(parts)} tasks")
        attempt, target = self._begin(job, why, done, total)
        job = attempt.job
        if not parts:
            self._complete(attempt)
            return
        retries = self.settings.job_retries
        key = f"{job.id}-{job.attempt}"
        first = client.submit(tasks.produce, parts[0], target, key=f"produce-{key}-0",
                              retries=retries, priority=len(parts))
        writes, futures = [first], [first]
        for i, part in enumerate(parts[1:], 1):
            computed = client.submit(tasks.compute, part, key=f"compute-{key}-{i}",
                                     retries=retries, priority=len(parts) - i)
            written = client.submit(tasks.write, target, computed, writes[-1],
                                    key=f"write-{key}-{i}", retries=retries,
                                    priority=len(parts) - i)
            writes.append(written)
            futures += [computed, written]
        attempt.writes, attempt.futures = writes, futures
        for future in writes:
            future.add_done_callback(self._ended_callback(job.id, job.attempt))
        log.info("job %s: %s", job.id, why)

    def _launch_mirror(self, client: Any, job: Job) -> None:
        """A mirror: the source's plan (or its stream's schema) comes from the other site; one
        task copies the runs and one verifies them, or one task follows the live stream."""
        spec, source = job.spec, self._source(job)
        try:
            if spec.follows:
                schema, endpoints = mirror.stream_schema(source, spec.source), []
            else:
                schema, endpoints = mirror.plan(source, spec.source)
        except (flight.FlightError, pa.ArrowException) as exc:  # its answer, with its status
            raise MirrorSourceError(f"the source {source.location}: {_describe(exc)}") from None
        self.live.check_into(spec.experiment, spec.stream, schema)
        done = self._resume_at(job)
        total = None if spec.follows else sum(e.records for e in endpoints)
        origin = f"from {source.location}"
        if spec.follows:
            why = f"following {spec.source.experiment}/{spec.source.stream} {origin}" + (
                f" after offset {done}" if done else "")
        else:
            why = (f"copying {total} events {origin}" if done == 0 else
                   f"resumed after {done} of {total} source events {origin}")
        attempt, target = self._begin(job, why, done, total)
        job = attempt.job
        key = f"{job.id}-{job.attempt}"
        retries = self.settings.job_retries
        if spec.follows:
            writes = [client.submit(mirror.follow, source, spec.source, done, target, job.id,
                                    key=f"follow-{key}", retries=retries)]
        else:
            copied = client.submit(mirror.copy, source, endpoints, done, target,
                                   key=f"copy-{key}", retries=retries)
            # verifying again would find the same difference: no retries
            writes = [copied, client.submit(mirror.verify, source, spec.source, target, copied,
                                            key=f"verify-{key}", retries=0)]
        attempt.writes, attempt.futures = writes, list(writes)
        for future in writes:
            future.add_done_callback(self._ended_callback(job.id, job.attempt))
        log.info("job %s: %s", job.id, why)

    def _begin(self, job: Job, why: str, done: int, total: int | None
               ) -> tuple[Attempt, tasks.Target]:
        """The job is running: its attempt, admitted from now on, and where its tasks write."""
        job = self.store.transition(job.id, RUNNING, why, events=done, events_total=total,
                                    node=self.node, expect=QUEUED)
        attempt = Attempt(job, f"{producer_prefix(job.id)}{job.attempt}", total, done,
                          job.bytes)
        self._running[job.id] = attempt  # the gate opens before any worker can write
        spec = job.spec
        target = tasks.Target(self.location, self._token(job), self.tls_roots,
                              self.tls_identity, spec.experiment, spec.stream, attempt.producer)
        return attempt, target

    def _source(self, job: Job) -> mirror.Source:
        origin = job.spec.origin
        sealed = self.store.credentials(job.id)
        try:
            token = None if sealed is None else self.credentials.open(sealed, job.id)
        except ValueError as exc:
            raise MirrorSourceError(str(exc)) from None
        roots = None if origin.tls_roots is None else origin.tls_roots.encode()
        return mirror.Source(origin.location, token, roots)

    def _parts(self, plan: planning.Plan, done: int) -> Iterator[tasks.Part]:
        """The plan's partitions as tasks, from source event `done` on."""
        ordinal = 0
        for p in plan.partitions:
            t = p.ticket
            if ordinal + p.records > done:
                skip = max(0, done - ordinal)
                yield tasks.Part(self.data, replace(t, start=t.start + skip * t.step),
                                 ordinal + skip, self.sizing)
            ordinal += p.records

    def _token(self, job: Job) -> str | None:
        if self.minter is None:
            return None  # --no-auth: the server is on loopback, its workers beside it
        into = (job.spec.experiment,)
        # a mirror reads back the stream it wrote, to compare it with the source
        grants = Grants(read=into, write=into) if job.spec.origin else Grants(write=into)
        return self.minter.mint(f"job:{job.id}", grants, JOB_TOKEN_TTL_S, job=job.id)

    def _ended_callback(self, job_id: str, attempt: int):
        def ended(future: Any) -> None:  # on Dask's event loop: hand over, decide elsewhere
            self._ended.put((job_id, attempt, future))
            self._wake.set()
        return ended

    # -- following ---------------------------------------------------------------------------

    def _settle(self, job_id: str, number: int, future: Any) -> None:
        with self._lock:
            attempt = self._running.get(job_id)
            if attempt is None or attempt.number != number or attempt.cancelling:
                return  # an earlier attempt's task, or one cancelled with its job
            status = future.status
            if status == "finished":
                if future.key not in attempt.settled:  # (a retry, after the state was away)
                    written: tasks.Written = future.result()
                    done = max(attempt.done, written.ordinal)
                    nbytes = attempt.bytes + written.bytes
                    self.store.progress(job_id, done, nbytes)
                    attempt.done, attempt.bytes = done, nbytes
                    attempt.settled.add(future.key)
                if len(attempt.settled) == len(attempt.writes):
                    self._complete(attempt)
            elif status == "error":
                self._fail(attempt, _describe(future.exception()))
            else:  # cancelled, but not by us: the scheduler was lost
                self._stop_tasks(attempt)
                del self._running[job_id]
                self.store.transition(job_id, QUEUED, "its Dask tasks were lost (the scheduler "
                                      "went away); it resumes when the scheduler is back")

    def _complete(self, attempt: Attempt) -> None:
        job, spec = attempt.job, attempt.job.spec
        why, run = f"all {attempt.total} source events done", None
        if spec.follows:
            why = (f"the source stream ended at offset {attempt.progress}; every event is "
                   "here")
        elif spec.origin is not None:
            why += "; the copy's digest equals the source's"
        try:
            if spec.end_run and attempt.run is None and self.live.has_events(
                    spec.experiment, spec.stream):
                attempt.run = self._end_stream(spec)["run"]
            if attempt.run is not None:
                run = attempt.run
                why += f"; the stream became run {run} of {spec.experiment}"
            elif spec.end_run:
                why += "; no event passed, so no run was made"
        except (InvalidArgument, NotFound, OSError) as exc:
            self._fail(attempt, f"its results are in the stream, but ending the stream as a "
                                f"run failed: {_describe(exc)}")
            return
        # recorded first: without the state, the attempt stays here, to be completed later
        self.store.transition(job.id, COMPLETED, why, run=run)
        del self._running[job.id]
        self._release(attempt)
        log.info("job %s: completed (%s)", job.id, why)

    def _end_stream(self, spec: JobSpec) -> dict[str, Any]:
        """The stream becomes the next run of its experiment; a mirrored run keeps its number
        where that is free here."""
        if spec.origin is not None and not spec.follows and len(spec.source.runs) == 1:
            try:
                return self.live.end_stream(spec.experiment, spec.stream, spec.source.runs[0])
            except InvalidArgument:
                pass  # taken here: the next free number
        return self.live.end_stream(spec.experiment, spec.stream)

    def _fail(self, attempt: Attempt, error: str) -> None:
        # recorded first: without the state, the attempt stays as it is, to fail later
        self.store.transition(attempt.job.id, FAILED, "a task failed after its retries",
                              error=error)
        self._stop_tasks(attempt)
        del self._running[attempt.job.id]
        log.warning("job %s failed: %s", attempt.job.id, error)

    def _stop_tasks(self, attempt: Attempt, fence: bool = True) -> None:
        attempt.cancelling = True  # the gate refuses its workers from now on
        if fence:
            self.live.fence(attempt.job.spec.experiment, attempt.job.spec.stream)
        self._release(attempt, cancel=True)

    def _release(self, attempt: Attempt, cancel: bool = False) -> None:
        futures, attempt.futures, attempt.writes = attempt.futures, [], []
        if cancel and futures:
            try:
                futures[0].client.cancel(futures, force=True)
            except Exception as exc:  # the scheduler is gone: so are the tasks
                log.info("job %s: cancelling its tasks: %s", attempt.job.id, exc)
        for future in futures:
            future.release()

    # -- what the service asks ---------------------------------------------------------------

    def cancel(self, job_id: str, who: str) -> None:
        """Stop the job; once this returns, its stream takes nothing more from it. In a
        cluster, a job another node runs is stopped there: this waits until it has been (or
        until the others have found that node dead and settled the job)."""
        with self._lock:
            job = self.store.get(job_id, None)
            if job is None or job.state not in (QUEUED, RUNNING):
                return
            self.store.request_cancel(job_id, who)
            if job_id in self._running:
                self._cancel_running(job_id, who)
                return
            try:
                self.store.transition(job_id, CANCELLED, f"cancelled by {who} while queued",
                                      expect=QUEUED)
                return
            except InvalidTransition:
                pass  # running on another node
        deadline = time.monotonic() + self.node_timeout_s + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            job = self.store.get(job_id, None)
            if job.state not in (QUEUED, RUNNING):
                return
            if job.state == QUEUED:  # queued again meanwhile: it will not start
                try:
                    self.store.transition(job_id, CANCELLED, f"cancelled by {who} while "
                                          "queued", expect=QUEUED)
                    return
                except InvalidTransition:
                    pass
            time.sleep(0.05)
        raise StateUnavailable(f"job {job_id} runs on {job.node}, which has not stopped it "
                               f"yet; the cancel is recorded, and the job stops there (or is "
                               "cancelled once that node is found dead)")

    def _cancel_running(self, job_id: str, who: str) -> None:
        attempt = self._running[job_id]
        self._stop_tasks(attempt)
        self.store.transition(job_id, CANCELLED, f"cancelled by {who} after "
                              f"{attempt.progress} of {attempt.total} source events")
        del self._running[job_id]
        self._wake.set()

    def abandon(self) -> None:
        """Let every running job go without recording it (the state is out of reach): their
        tasks stop and their batches are refused here; the node that finds them orphaned
        (this one, once the state is back) queues them again. Done by the queue's thread,
        soon: the caller (the heartbeat) must not wait for a decision that waits for the
        database. Meanwhile the node's streams, let go of first, take no batch."""
        self._abandon = True
        self._wake.set()

    def _abandon_all(self) -> None:
        with self._lock:
            self._abandon = False
            for attempt in self._running.values():
                self._stop_tasks(attempt, fence=False)  # its stream is let go of already
            abandoned, self._running = list(self._running), {}
        if abandoned:
            log.warning("jobs: let go of %d running jobs: %s", len(abandoned),
                        ", ".join(abandoned))

    def live_progress(self, job_id: str) -> int | None:
        attempt = self._running.get(job_id)
        return attempt.progress if attempt is not None else None

    def admit(self, identity: Identity, sub: Subscription, producer: str | None,
              seq: int | None) -> None:
        """May this batch be stored? Only a job's current attempt writes into its stream, and
        only while the job runs; a job's token produces nothing else. Other producers pass."""
        job_id = identity.job
        if job_id is None:
            if producer is None or not producer.startswith("job-"):
                return
            job_id = producer[4:].rpartition("-")[0]
        attempt = self._running.get(job_id)
        spec = attempt.job.spec if attempt is not None else None
        if (attempt is None or attempt.cancelling or producer != attempt.producer
                or (sub.experiment, sub.stream) != (spec.experiment, spec.stream)):
            raise Forbidden(f"job {job_id} is not running, or this is not its current producer "
                            "and stream: the batch was not stored (producer names starting "
                            "with 'job-' are the jobs')")
        if seq is not None and seq > attempt.seen:
            attempt.seen = seq


def _reachable(location: str) -> str:
    """The server's own location, with a wildcard address made the host's name, which its
    workers on other nodes can reach."""
    for wildcard in ("0.0.0.0", "[::]"):
        if f"://{wildcard}:" in location:
            return location.replace(wildcard, socket.getfqdn(), 1)
    return location
