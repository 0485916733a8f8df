"""The job table (flight_server/jobs/store.py): owners, idempotency, the per-user limit, states
and their history, and persistence across a reopen and a kill -9; the table logic runs on both
backends, SQLite and a cluster's PostgreSQL (jobs/shared_store.py)."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flight_server.cluster.state import ClusterState, StateUnavailable
from flight_server.errors import InvalidArgument
from flight_server.jobs.shared_store import SharedJobStore
from flight_server.jobs.store import InvalidTransition, JobStore, LocalJobStore
from schemas.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    JobSpec,
    parse_submit,
)
from tests.cluster.postgres import Postgres

ALICE, BOB, OTHER_ALICE = ("alice", "lclstream"), ("bob", "lclstream"), ("alice", "elsewhere")


_streams = itertools.count()


def spec(key: str | None = None, stream: str | None = None) -> JobSpec:
    """A job into a stream of its own (two active jobs never share one), or into `stream`."""
    stream = stream or f"hits{next(_streams)}"
    body = {"v": 1, "source": {"v": 1, "experiment": "cxilu9218", "runs": [12]},
            "into": {"experiment": "cxilu9218", "stream": stream}}
    if key is not None:
        body["key"] = key
    return parse_submit(json.dumps(body))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """One server's table, and a cluster's (in a database of its own per test)."""
    if request.param == "sqlite":
        s: JobStore = LocalJobStore(tmp_path / "state" / "jobs.sqlite")
    else:
        s = SharedJobStore(request.getfixturevalue("postgres").database())
    yield s
    s.close()


def test_a_submitted_job_is_queued_with_its_history(store: JobStore) -> None:
    job, created = store.submit(ALICE, spec(stream="hits"), limit=8)
    assert created and job.state == QUEUED and len(job.id) == 32
    status = job.status()
    assert status["owner"] == "alice" and status["into"] == {"experiment": "cxilu9218",
                                                             "stream": "hits"}
    assert status["progress"] == {"events": 0, "events_total": None, "bytes": 0}
    assert [(t["state"], t["reason"]) for t in status["transitions"]] == [(QUEUED, "submitted")]
    assert status["created"].endswith("+00:00") and status["started"] is None


def test_the_same_key_returns_the_same_job_per_owner(store: JobStore) -> None:
    first, created = store.submit(ALICE, spec("nightly", stream="hits"), limit=8)
    again, created_again = store.submit(ALICE, spec("nightly", stream="other"), limit=8)
    assert created and not created_again and again.id == first.id
    assert again.spec.stream == "hits"  # what was submitted first
    bobs, bob_created = store.submit(BOB, spec("nightly"), limit=8)
    elsewhere, _ = store.submit(OTHER_ALICE, spec("nightly"), limit=8)
    assert bob_created and len({first.id, bobs.id, elsewhere.id}) == 3


def test_owners_see_only_their_jobs_and_admins_all(store: JobStore) -> None:
    mine, _ = store.submit(ALICE, spec(), limit=8)
    theirs, _ = store.submit(BOB, spec(), limit=8)
    assert store.get(mine.id, ALICE) == mine
    assert store.get(theirs.id, ALICE) is None  # as if it did not exist
    assert store.get(mine.id, OTHER_ALICE) is None  # same name, another issuer
    assert store.get("f" * 32, ALICE) is None
    assert store.get(theirs.id, None) == theirs
    assert [j.id for j in store.jobs(ALICE)] == [mine.id]
    assert [j.id for j in store.jobs(None)] == [theirs.id, mine.id]  # newest first


def test_listing_filters_by_state_and_limits(store: JobStore) -> None:
    ids = [store.submit(ALICE, spec(), limit=100)[0].id for _ in range(5)]
    store.transition(ids[1], RUNNING, "started")
    assert [j.id for j in store.jobs(ALICE, RUNNING)] == [ids[1]]
    assert [j.id for j in store.jobs(ALICE, QUEUED, limit=2)] == [ids[4], ids[3]]


def test_states_move_forward_with_times_and_reasons(store: JobStore) -> None:
    job, _ = store.submit(ALICE, spec(), limit=8)
    running = store.transition(job.id, RUNNING, "on worker tcp://127.0.0.1:1234")
    assert running.started is not None and running.finished is None
    requeued = store.transition(job.id, QUEUED, "server restarted")
    again = store.transition(job.id, RUNNING, "resumed at event 40")
    assert again.started == running.started == requeued.started  # the first start is kept
    store.progress(job.id, events=60, nbytes=6 << 20, events_total=100)
    done = store.transition(job.id, COMPLETED, "all events produced", run=13)
    assert done.finished >= done.started and done.run == 13
    assert done.status()["progress"] == {"events": 60, "events_total": 100, "bytes": 6 << 20}
    assert [t[0] for t in done.transitions] == [QUEUED, RUNNING, QUEUED, RUNNING, COMPLETED]
    assert [t[2] for t in done.transitions][-1] == "all events produced"
    times = [t[1] for t in done.transitions]
    assert times == sorted(times)
    for state in (QUEUED, RUNNING, FAILED, CANCELLED, COMPLETED):
        with pytest.raises(InvalidTransition, match="completed"):
            store.transition(job.id, state, "too late")
    with pytest.raises(InvalidTransition):
        store.transition(store.submit(ALICE, spec(), limit=8)[0].id, "paused", "no such state")


def test_a_failed_job_keeps_its_error(store: JobStore) -> None:
    job, _ = store.submit(ALICE, spec(), limit=8)
    failed = store.transition(job.id, FAILED, "retries spent", error="worker lost 3 times")
    assert failed.status()["error"] == "worker lost 3 times" and failed.state == FAILED


def test_the_per_user_limit_counts_queued_and_running(store: JobStore) -> None:
    first, _ = store.submit(ALICE, spec(), limit=2)
    store.submit(ALICE, spec(), limit=2)
    with pytest.raises(InvalidArgument, match="2 jobs queued or running"):
        store.submit(ALICE, spec(), limit=2)
    store.submit(BOB, spec(), limit=2)  # per user
    store.transition(first.id, CANCELLED, "cancelled by alice")
    store.submit(ALICE, spec(), limit=2)  # room again


def test_the_limit_holds_under_concurrent_submits(store: JobStore) -> None:
    outcomes: list[str] = []

    def submit() -> None:
        try:
            store.submit(ALICE, spec(), limit=3)
            outcomes.append("queued")
        except InvalidArgument:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["queued"] * 3 + ["refused"] * 9
    assert len(store.jobs(ALICE)) == 3


def test_jobs_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    store = LocalJobStore(path)
    job, _ = store.submit(ALICE, spec("k"), limit=8)
    store.transition(job.id, RUNNING, "started")
    store.close()
    store = LocalJobStore(path)
    try:
        again = store.get(job.id, ALICE)
        assert again == store.jobs(None)[0] and again.state == RUNNING
        assert [j.id for j in store.in_state(RUNNING)] == [job.id]
        assert store.submit(ALICE, spec("k"), limit=8)[0].id == job.id
    finally:
        store.close()


CHILD = """
import os, signal, sys, json
from flight_server.jobs.store import LocalJobStore
from schemas.jobs import parse_submit
store = LocalJobStore(sys.argv[1])
body = {"v": 1, "source": {"v": 1, "experiment": "e", "runs": [1]},
        "into": {"experiment": "e", "stream": "s"}}
job, _ = store.submit(("alice", "lclstream"), parse_submit(json.dumps(body)), 8)
print(job.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # acknowledged, then gone without closing anything
"""


def test_an_acknowledged_submit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    job_id = done.stdout.strip()
    store = LocalJobStore(path)
    try:
        job = store.get(job_id, ALICE)
        assert job is not None and job.state == QUEUED and job.created <= time.time()
    finally:
        store.close()


def test_two_active_jobs_never_share_a_stream(store: JobStore) -> None:
    first, _ = store.submit(ALICE, spec(stream="shared"), limit=8)
    with pytest.raises(InvalidArgument, match=f"job {first.id} .queued.*name another stream"):
        store.submit(BOB, spec(stream="shared"), limit=8)
    store.transition(first.id, RUNNING, "started")
    store.transition(first.id, COMPLETED, "done")
    second, created = store.submit(BOB, spec(stream="shared"), limit=8)
    assert created and second.state == QUEUED  # a finished job's stream may take another


def test_a_state_another_writer_changed_first_is_refused(store: JobStore) -> None:
    """Nodes start and stop a job with `expect`: the second of two nodes to start a queued job
    is told that it runs already, and a node never settles another node's job."""
    job, _ = store.submit(ALICE, spec(), limit=8)
    started = store.transition(job.id, RUNNING, "started", node="a", expect=QUEUED)
    assert started.node == "a" and started.status()["node"] == "a"
    with pytest.raises(InvalidTransition, match="running"):
        store.transition(job.id, RUNNING, "started too", node="b", expect=QUEUED)
    with pytest.raises(InvalidTransition, match="running on a"):
        store.transition(job.id, QUEUED, "node b thought a dead", expect=RUNNING,
                         expect_node="b")
    requeued = store.transition(job.id, QUEUED, "a went silent", expect=RUNNING,
                                expect_node="a")
    assert requeued.node == "a"  # who ran it last, until another node starts it
    assert store.transition(job.id, RUNNING, "resumed", node="b").node == "b"


def test_a_cancel_is_recorded_for_the_node_that_runs_the_job(store: JobStore) -> None:
    job, _ = store.submit(ALICE, spec(), limit=8)
    other, _ = store.submit(ALICE, spec(), limit=8)
    store.transition(job.id, RUNNING, "started", node="a")
    store.transition(other.id, RUNNING, "started", node="b")
    assert store.cancels_for("a") == []
    store.request_cancel(job.id, "alice")
    store.request_cancel(job.id, "an admin")  # the first to ask is named
    assert store.cancels_for("a") == [(job.id, "alice")] and store.cancels_for("b") == []
    assert store.get(job.id, ALICE).status()["cancel_requested"] is True
    store.transition(job.id, CANCELLED, "cancelled by alice")
    assert store.cancels_for("a") == []  # settled


def test_two_nodes_racing_for_the_queue_start_each_job_once(postgres: Postgres) -> None:
    """Two stores on one database, as two nodes: each tries to start every queued job; every
    job starts exactly once."""
    url = postgres.database()
    nodes = [SharedJobStore(url), SharedJobStore(url)]
    try:
        ids = [nodes[0].submit(ALICE, spec(), limit=50)[0].id for _ in range(20)]
        started: dict[str, list[str]] = {"a": [], "b": []}

        def take(name: str, store: JobStore) -> None:
            for job in store.in_state(QUEUED):
                try:
                    store.transition(job.id, RUNNING, f"started on {name}", node=name,
                                     expect=QUEUED)
                    started[name].append(job.id)
                except InvalidTransition:
                    pass

        threads = [threading.Thread(target=take, args=(name, s))
                   for name, s in zip("ab", nodes, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(started["a"] + started["b"]) == sorted(ids)
        assert all(j.attempt == 1 for j in nodes[1].jobs(None))
    finally:
        for s in nodes:
            s.close()


def test_the_jobs_of_a_silent_node_are_orphans(postgres: Postgres) -> None:
    url = postgres.database()
    state = ClusterState(url)
    state.create()
    store = SharedJobStore(url)
    try:
        state.register("a", "grpc://a:1")
        state.register("b", "grpc://b:1")
        on = {}
        for node in "ab":
            job, _ = store.submit(ALICE, spec(), limit=8)
            on[node] = store.transition(job.id, RUNNING, "started", node=node).id
        assert [j.id for j in store.orphans("a", timeout_s=30)] == [on["a"]]  # a's own
        state.execute("UPDATE lclstream_nodes SET last_seen = now() - interval '1 minute' "
                      "WHERE id = 'b'")
        assert {j.id for j in store.orphans("a", timeout_s=30)} == {on["a"], on["b"]}
        assert [j.id for j in store.orphans("c", timeout_s=30)] == [on["b"]]
    finally:
        store.close()
        state.close()


def test_without_the_database_the_table_is_unavailable_and_comes_back(
        postgres: Postgres) -> None:
    store = SharedJobStore(postgres.database())
    try:
        job, _ = store.submit(ALICE, spec(), limit=8)
        postgres.stop()
        try:
            with pytest.raises(StateUnavailable, match="unreachable"):
                store.submit(ALICE, spec(), limit=8)
            with pytest.raises(StateUnavailable):
                store.get(job.id, ALICE)
        finally:
            postgres.start()
        assert store.get(job.id, ALICE).state == QUEUED  # reconnected, nothing lost
        assert store.submit(ALICE, spec(), limit=8)[1]
    finally:
        store.close()
