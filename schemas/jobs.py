"""Data-request jobs: the bodies of the `submit`, `job`, `jobs` and `cancel` actions, and the
states a job goes through.

A job is a request (as GetFlightInfo takes it) produced into a live stream `[E, "live", S]`;
with `end_run` the stream becomes a run of E when the job completes. A mirror job reads its
source from another site's server (`from`): a request for runs, copied and verified against the
source's digest, or a live subscription, followed as a consumer-group member. States go
`queued -> running -> completed | failed | cancelled`; a running job that its server lost (a
restart) goes back to `queued` and resumes where its stream's acknowledged events end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from schemas.json_input import RequestError
from schemas.live import Subscription, is_subscription, parse_subscription
from schemas.request import Request, load_document, parse_request

SCHEMA = "jobs.schema.json"
QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "queued", "running", "completed", "failed", "cancelled")
STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})
# state -> the states it may go to
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({COMPLETED, FAILED, CANCELLED, QUEUED}),
    COMPLETED: frozenset(), FAILED: frozenset(), CANCELLED: frozenset(),
}
DEFAULT_LIST_LIMIT = 100


@dataclass(frozen=True)
class Origin:
    """The other site's server a mirror job reads from. Its credentials are not part of the
    spec: the server keeps them sealed apart, and drops them when the job ends."""

    location: str  # grpc://host:port or grpc+tls://host:port
    tls_roots: str | None = None  # PEM of the CA that signed its certificate

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"location": self.location}
        if self.tls_roots is not None:
            doc["tls_roots"] = self.tls_roots
        return doc


@dataclass(frozen=True)
class JobSpec:
    """What `submit` asks for, validated: the source and where its events go."""

    source: Request | Subscription  # a Subscription only with an origin: a live mirror
    experiment: str  # into
    stream: str
    end_run: bool = True
    key: str | None = None
    origin: Origin | None = None
    # the bearer token for the origin, as submitted: never stored in the spec, never compared
    origin_token: str | None = field(default=None, compare=False, repr=False)

    @property
    def follows(self) -> bool:
        """A live mirror: follows a stream at the origin until it ends."""
        return isinstance(self.source, Subscription)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": 1, "source": self.source.to_json(),
                               "into": {"experiment": self.experiment, "stream": self.stream},
                               "end_run": self.end_run}
        if self.key is not None:
            doc["key"] = self.key
        if self.origin is not None:
            doc["from"] = self.origin.to_json()
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def parse_submit(raw: bytes | str) -> JobSpec:
    """The submit body, its source validated as GetFlightInfo validates a request (or, for a
    live mirror, as DoGet validates a subscription)."""
    return spec_from_json(load_document(raw, "submit", SCHEMA, "submit"))


def spec_from_json(doc: dict[str, Any]) -> JobSpec:
    """A validated submit document as a JobSpec (also how the job table reads its specs)."""
    raw_source = json.dumps(doc["source"]).encode()
    origin_doc = doc.get("from")
    try:
        if is_subscription(raw_source):
            if origin_doc is None:
                raise RequestError("a live stream is a job's source only for a mirror: give "
                                   "'from', the server the stream is on")
            source: Request | Subscription = parse_subscription(raw_source)
            if source.group is not None or source.member is not None:
                raise RequestError("a mirror follows the stream as a consumer group of its "
                                   "own: leave out 'group' and 'member'")
        else:
            source = parse_request(raw_source)
    except RequestError as exc:
        raise RequestError(f"the job's source: {exc}") from None
    origin = None
    if origin_doc is not None:
        origin = Origin(origin_doc["location"], origin_doc.get("tls_roots"))
    into = doc["into"]
    return JobSpec(source, into["experiment"], into["stream"], doc.get("end_run", True),
                   doc.get("key"), origin, origin_doc.get("token") if origin_doc else None)


def parse_job_id(raw: bytes | str, action: str) -> str:
    """The job a `job` or `cancel` body names."""
    return load_document(raw, f"the body of {action}", SCHEMA, "job")["job"]


def parse_listing(raw: bytes | str) -> tuple[str | None, int]:
    """(state or None for all, limit) of a `jobs` body; an empty body lists everything."""
    doc = load_document(raw or b"{}", "the body of jobs", SCHEMA, "jobs")
    return doc.get("state"), doc.get("limit", DEFAULT_LIST_LIMIT)
