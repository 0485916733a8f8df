"""Data-request jobs: the bodies of the `submit`, `job`, `jobs` and `cancel` actions, and the
states a job goes through.

A job is a request (as GetFlightInfo takes it) produced into a live stream `[E, "live", S]`;
with `end_run` the stream becomes a run of E when the job completes. States go
`queued -> running -> completed | failed | cancelled`; a running job that its server lost (a
restart) goes back to `queued` and resumes where its stream's acknowledged events end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schemas.json_input import RequestError
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
class JobSpec:
    """What `submit` asks for, validated: the source request and where its events go."""

    source: Request
    experiment: str  # into
    stream: str
    end_run: bool = True
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": 1, "source": self.source.to_json(),
                               "into": {"experiment": self.experiment, "stream": self.stream},
                               "end_run": self.end_run}
        if self.key is not None:
            doc["key"] = self.key
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def parse_submit(raw: bytes | str) -> JobSpec:
    """The submit body, its source validated as GetFlightInfo validates a request."""
    doc = load_document(raw, "submit", SCHEMA, "submit")
    try:
        source = parse_request(json.dumps(doc["source"]))
    except RequestError as exc:
        raise RequestError(f"the job's source: {exc}") from None
    into = doc["into"]
    return JobSpec(source, into["experiment"], into["stream"], doc.get("end_run", True),
                   doc.get("key"))


def parse_job_id(raw: bytes | str, action: str) -> str:
    """The job a `job` or `cancel` body names."""
    return load_document(raw, f"the body of {action}", SCHEMA, "job")["job"]


def parse_listing(raw: bytes | str) -> tuple[str | None, int]:
    """(state or None for all, limit) of a `jobs` body; an empty body lists everything."""
    doc = load_document(raw or b"{}", "the body of jobs", SCHEMA, "jobs")
    return doc.get("state"), doc.get("limit", DEFAULT_LIST_LIMIT)
