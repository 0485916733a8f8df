"""The job actions' bodies (schemas/jobs.py): what is accepted, and what is refused and why."""

from __future__ import annotations

import json

import pytest

from schemas import RequestError
from schemas.jobs import parse_job_id, parse_listing, parse_submit

SOURCE = {"v": 1, "experiment": "cxilu9218", "runs": [12], "columns": ["pnccd/image"],
          "processing": [{"step": "peaks", "column": "pnccd/image"}]}


def submit(**changes: object) -> bytes:
    doc = {"v": 1, "source": SOURCE, "into": {"experiment": "cxilu9218", "stream": "hits"},
           **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_a_submit_round_trips() -> None:
    spec = parse_submit(submit(key="nightly-12", end_run=False))
    assert (spec.experiment, spec.stream, spec.end_run, spec.key) == (
        "cxilu9218", "hits", False, "nightly-12")
    assert spec.source.runs == (12,) and spec.source.processing[0]["step"] == "peaks"
    assert parse_submit(spec.encode()) == spec
    assert parse_submit(submit()).end_run is True  # the default


@pytest.mark.parametrize("body, phrase", [
    (submit(surprise=1), "Additional properties"),
    (submit(v=2), "at v"),
    (submit(into=None), "'into' is a required property"),
    (submit(into={"experiment": "x"}), "'stream' is a required property"),
    (submit(into={"experiment": "x", "stream": "s", "run": 3}), "Additional properties"),
    (submit(source={**SOURCE, "runs": []}), "the job's source"),
    (submit(source={**SOURCE, "runs": [1e308]}), "the job's source"),
    (submit(source={**SOURCE, "colums": ["x"]}), "the job's source"),
    (submit(key="k" * 129), "at key"),
    (submit(end_run="yes"), "at end_run"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"not json", "not valid JSON"),
], ids=["unknown", "version", "no-into", "into-no-stream", "into-unknown", "no-runs",
        "float-run", "source-unknown", "long-key", "end-run-type", "deep", "not-json"])
def test_bad_submits_say_what_is_wrong(body: bytes, phrase: str) -> None:
    with pytest.raises(RequestError, match=phrase):
        parse_submit(body)


def test_job_ids_and_listings() -> None:
    job = "0123456789abcdef0123456789abcdef"
    assert parse_job_id(json.dumps({"job": job}), "cancel") == job
    for bad in ({"job": "../etc"}, {"job": 7}, {}, {"job": job, "x": 1}):
        with pytest.raises(RequestError, match="the body of cancel"):
            parse_job_id(json.dumps(bad), "cancel")
    assert parse_listing(b"") == (None, 100)
    assert parse_listing(b'{"state": "running", "limit": 5}') == ("running", 5)
    for bad in (b'{"state": "done"}', b'{"limit": 0}', b'{"limit": 10001}', b'{"limit": 2.0}'):
        with pytest.raises(RequestError):
            parse_listing(bad)
