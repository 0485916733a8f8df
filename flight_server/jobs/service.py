"""The Flight surface of data-request jobs: the actions `submit`, `job`, `jobs` and `cancel`.

`submit` validates the request as GetFlightInfo does (same checks, same messages) and checks
that its results fit the stream they go into, so nothing is queued that cannot run. A job is
its owner's: another user asking about it gets NOT_FOUND, as for a job that does not exist,
unless they administer the experiment it writes into.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow.flight as flight

from flight_server.archive import planning
from flight_server.catalog import Catalog
from flight_server.config import Settings
from flight_server.errors import InvalidArgument, NotFound, Unsupported
from flight_server.jobs.engine import Engine
from flight_server.jobs.runner import Runner
from flight_server.jobs.shared_store import SharedJobStore
from flight_server.jobs.store import Job, JobStore, LocalJobStore
from flight_server.live.service import LiveService
from flight_server.security import keys
from flight_server.security.middleware import CallRecord
from flight_server.security.policy import Forbidden, Identity, authorize
from flight_server.security.sealed import CredentialSeal
from flight_server.security.tokens import TokenMinter
from flight_server.sources.streaming import BatchSizing
from schemas import RequestError
from schemas.jobs import QUEUED, parse_job_id, parse_listing, parse_submit

log = logging.getLogger(__name__)

ACTIONS = {
    "submit": "JSON {v, source, from?, into: {experiment, stream}, end_run, key}: queue a data "
              "request as a job producing into a live stream (from: another site's server to "
              "mirror runs or a live stream from); answers the job's status",
    "job": "JSON {job}: a job's status, progress and transitions",
    "jobs": "JSON {state?, limit?}: your jobs, newest first (an admin sees all)",
    "cancel": "JSON {job}: cancel a job; answers its status once it has stopped",
}

NO_SHARED_SCHEDULER = (
    "this cluster runs no data-request jobs: its nodes share one Dask scheduler for them, and "
    "this node was started without one; start every node with --dask-scheduler "
    "tcp://HOST:8786 (README: Running a cluster)")
ALL_JOBS = 1_000_000  # an admin's listing is filtered after reading: read them all


class JobService:
    def __init__(self, settings: Settings, catalog: Catalog, live: LiveService,
                 minter: TokenMinter | None, sizing: BatchSizing) -> None:
        self.settings = settings
        self.catalog = catalog
        self.sizing = sizing
        self.live = live
        # a cluster's nodes share the job table, and run their jobs on one Dask scheduler
        self.store: JobStore = (SharedJobStore(settings.state_url) if settings.cluster
                                else LocalJobStore(settings.jobs_path()))
        self.engine = Engine(settings.dask_scheduler, settings.job_workers)
        self.credentials = CredentialSeal(keys.credential_key(settings.state_path()))
        self.runner = Runner(settings, self.store, self.engine, catalog, live, minter, sizing,
                             self.credentials)
        live.admit_job = self.runner.admit

    @property
    def runs(self) -> bool:
        """Whether this server runs jobs: a cluster's node only with the shared scheduler."""
        return not self.settings.cluster or self.settings.dask_scheduler is not None

    def start(self, server_location: str, node: str | None = None,
              node_timeout_s: float = 0.0) -> None:
        """Take jobs; `node`: this cluster node's id (its jobs are recorded as its)."""
        if self.runs:
            self.runner.start(server_location, node, node_timeout_s)
        else:
            log.warning("jobs: %s", NO_SHARED_SCHEDULER)

    def abandon(self) -> None:
        """A cluster node that lost the state lets its jobs go (another node resumes them)."""
        self.runner.abandon()

    def stop(self) -> None:
        self.runner.stop()

    def close(self) -> None:
        self.runner.stop()
        self.engine.close()
        self.store.close()

    # -- actions -----------------------------------------------------------------------------

    def do_action(self, call: CallRecord, action: flight.Action) -> Iterator[bytes]:
        body = action.body.to_pybytes() if action.body is not None else b""
        try:
            if action.type == "submit":
                answer: Any = self._submit(call, body)
            elif action.type == "jobs":
                answer = self._jobs(call.identity, body)
            else:
                job = self._visible(call.identity, parse_job_id(body, action.type))
                if action.type == "cancel":
                    self.runner.cancel(job.id, call.identity.subject)
                answer = self._status(self.store.get(job.id, None))
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None
        return iter([json.dumps(answer).encode()])

    def _submit(self, call: CallRecord, body: bytes) -> dict[str, Any]:
        if not self.runs:
            raise Unsupported(NO_SHARED_SCHEDULER)
        spec = parse_submit(body)
        identity = call.identity
        if spec.origin is None:
            call.experiment = spec.source.experiment
            authorize(identity, spec.source.experiment, "read")
            authorize(identity, spec.experiment, "write")
            plan = planning.plan(spec.source, self.catalog, self.settings.job_partition_bytes,
                                 lambda e: identity.may(e, "read"), self.sizing.event_budget)
            self.live.check_into(spec.experiment, spec.stream, plan.schema)
        else:
            # A mirror: the source server decides what may be read there, when the job starts
            # (a refusal fails the job with its status); here it writes into a local stream.
            call.experiment = spec.experiment
            authorize(identity, spec.experiment, "write")
        token = spec.origin_token
        seal = None if token is None else (lambda job_id: self.credentials.seal(token, job_id))
        job, created = self.store.submit(identity.owner, spec, self.settings.job_limit, seal)
        if not created and job.spec != spec:
            raise InvalidArgument(f"key {spec.key!r} was used for another request (job "
                                  f"{job.id}); use a new key for a new request")
        self.runner.wake()
        return {**self._status(job), "new": created}  # False: the key's earlier job

    def _jobs(self, identity: Identity, body: bytes) -> list[dict[str, Any]]:
        state, limit = parse_listing(body)
        if not identity.grants.admin:
            return [self._summary(j) for j in self.store.jobs(identity.owner, state, limit)]
        visible = [j for j in self.store.jobs(None, state, ALL_JOBS)
                   if self._may_see(identity, j)]
        return [self._summary(j) for j in visible[:limit]]

    def reads_own_stream(self, identity: Identity, kind: str, what: Any) -> None:
        """A job's token reads nothing but its own stream (a mirror compares it with the
        source): not the runs, not another stream of the experiment it may write into."""
        if identity.job is None:
            return
        job = self.store.get(identity.job, None)
        own = job is not None and kind == "live" and (what.experiment, what.stream) == (
            job.spec.experiment, job.spec.stream)
        if not own:
            raise Forbidden(f"a job's token (job {identity.job}) reads its own stream only")

    # -- whose jobs --------------------------------------------------------------------------

    @staticmethod
    def _may_see(identity: Identity, job: Job) -> bool:
        # a job's own token asks too: a mirror following a stream stops when its job does
        return (job.owner == identity.owner or identity.job == job.id
                or identity.may(job.spec.experiment, "admin"))

    def _visible(self, identity: Identity, job_id: str) -> Job:
        job = self.store.get(job_id, None)
        if job is None or not self._may_see(identity, job):
            raise NotFound(f"no job {job_id} (a job is seen by its owner and by admins of the "
                           "experiment it writes into)")
        return job

    # -- answers -----------------------------------------------------------------------------

    def _status(self, job: Job) -> dict[str, Any]:
        status = job.status()
        live = self.runner.live_progress(job.id)
        if live is not None:
            status["progress"]["events"] = max(status["progress"]["events"], live)
        if job.state == QUEUED and self.runner.waiting:
            status["waiting"] = self.runner.waiting
        return status

    def _summary(self, job: Job) -> dict[str, Any]:
        status = self._status(job)
        del status["transitions"]
        return status
