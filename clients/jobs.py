"""Data-request jobs from Python: submit a request, follow it, read its results.

    >>> job = c.submit("cxilu9218", [12, 13], processing=[{"op": "peaks", ...}],
    ...                into=("cxilu9218", "peaks-v1"))
    >>> for batch in job.stream():     # results as they are produced
    ...     ...
    >>> job.wait()                     # a progress bar of source events done
    >>> table = job.read()             # the whole result (the run it became)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

FINAL = ("completed", "failed", "cancelled")
log = logging.getLogger(__name__)


def mirror_body(source: dict[str, Any], origin: dict[str, Any], experiment: str, stream: str,
                end_run: bool, key: str | None) -> dict[str, Any]:
    """The submit body of a mirror job (schemas/jobs.schema.json)."""
    body = {"v": 1, "source": source, "from": origin,
            "into": {"experiment": experiment, "stream": stream}, "end_run": end_run}
    if key is not None:
        body["key"] = key
    return body


def source_credentials(source: str, experiment: str, token: str | None, tls_root_certs: Any,
                       ttl: int | None) -> str | None:
    """The token a mirror job gets for the source: the one given, else the user's own for
    that server narrowed there to reading `experiment` for `ttl` seconds (a server that does
    not issue tokens itself cannot narrow one: it is then handed on as it is)."""
    if token is not None:
        return token
    from clients import credentials
    from clients.client import Client

    own = credentials.find_token(source)
    if not own:
        return None  # a server without authentication
    with Client(source, own, tls_root_certs=tls_root_certs) as there:
        try:
            return there.narrow_token(read=experiment, ttl=ttl)
        except (flight.FlightError, pa.ArrowNotImplementedError) as exc:
            log.warning("the source %s did not narrow your token (%s); the job gets it as it "
                        "is", source, str(exc).split(". Detail:")[0])
            return own


class JobFailed(RuntimeError):
    """The job failed or was cancelled; `status` is its last status."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        why = status.get("error") or (status["transitions"][-1]["reason"]
                                      if status.get("transitions") else status["state"])
        super().__init__(f"job {status['job']} {status['state']}: {why}")


class Job:
    """A submitted job. Its status is fetched afresh by every call that needs it."""

    def __init__(self, client: Any, status: dict[str, Any]) -> None:
        self._client = client
        self.id: str = status["job"]
        self.last: dict[str, Any] = status  # the status last fetched
        self.into: tuple[str, str] = (status["into"]["experiment"], status["into"]["stream"])

    def __repr__(self) -> str:
        p = self.last["progress"]
        return (f"<Job {self.id} {self.last['state']}: {p['events']} of "
                f"{p['events_total'] if p['events_total'] is not None else '?'} events>")

    def status(self) -> dict[str, Any]:
        """{job, owner, state, created, started, finished, progress, error, into, run,
        transitions}."""
        self.last = self._client._action("job", {"job": self.id})
        return self.last

    @property
    def state(self) -> str:
        return self.status()["state"]

    def cancel(self) -> dict[str, Any]:
        """Cancel; returns the status once the job has stopped (its stream keeps what was
        acknowledged)."""
        self.last = self._client._action("cancel", {"job": self.id})
        return self.last

    def wait(self, timeout: float | None = None, progress: bool = True,
             poll: float = 0.25) -> dict[str, Any]:
        """Wait until the job has finished and return its status; JobFailed if it failed or
        was cancelled, TimeoutError after `timeout` seconds. `progress` shows a bar of the
        source events done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        try:
            while True:
                status = self.status()
                if progress:
                    bar = _advance(bar, status, self.id)
                if status["state"] in FINAL:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {status['state']} after "
                                       f"{timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()
        if status["state"] != "completed":
            raise JobFailed(status)
        return status

    def stream(self, poll: float = 0.1, **options: Any) -> Iterator[pa.RecordBatch]:
        """The results as they are produced: the job's live stream from its first event (a
        `Subscription`; options as for `Client.subscribe`). With end_run, the iteration ends
        when the job completes. Waits for the job's first results if there are none yet; a job
        that ends without any gives an empty iteration (JobFailed if it failed)."""
        while not any(s["stream"] == self.into[1] for s in self._client.streams(self.into[0])):
            status = self.status()
            if status["state"] in FINAL:
                if status["state"] != "completed":
                    raise JobFailed(status)
                return _NoResults()
            time.sleep(poll)
        return self._client.subscribe(*self.into, **{"from_": "earliest", **options})

    def read(self, columns: list[str] | None = None, timeout: float | None = None) -> pa.Table:
        """The whole result, once the job has completed: the run it became, or (without
        end_run) every event of its stream."""
        status = self.wait(timeout=timeout, progress=False)
        if status["run"] is not None:
            return self._client.read(self.into[0], status["run"], columns)
        if not any(s["stream"] == self.into[1] for s in self._client.streams(self.into[0])):
            return pa.table({})  # no event passed the job's filter: no stream was made
        return self._client.read_stream(*self.into, columns)


class _NoResults:
    """What `stream` gives for a job that completed without results: an empty iteration that
    can be used as a Subscription is (`with`, `next`, `schema`)."""

    next = offset = schema = None

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return iter(())

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoResults:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _advance(bar: Any, status: dict[str, Any], job_id: str) -> Any:
    total, done = status["progress"]["events_total"], status["progress"]["events"]
    if bar is None and total is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="event", desc=f"job {job_id[:8]}")
    if bar is not None:
        bar.update(done - bar.n)
        bar.set_postfix_str(status["state"], refresh=False)
    return bar

