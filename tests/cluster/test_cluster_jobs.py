"""Jobs in a cluster: three nodes share the job table in PostgreSQL and one Dask scheduler (a
real LocalCluster of worker processes). A job submitted to any node runs once, on the node that
owns its stream; any node answers for it and cancels it; a node that goes away has its running
job resumed by another; with the database away, job actions are UNAVAILABLE and the jobs go on
once it is back. The live jobs mirror a stream of a separate server, which only ends when the
test ends it: they run as long as a test needs."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from distributed import LocalCluster

from clients import Client, connect
from flight_server.generator import generate_lcls2_run
from flight_server.server import LclstreamServer
from tests.cluster.conftest import CLUSTER, location, serve
from tests.cluster.postgres import Postgres
from tests.helpers import (
    LCLS2_EXP,
    admin_token,
    events,
    indices,
    interrupt,
    start_server,
    wait_until,
)
from tests.jobs.conftest import JOB_SETTINGS, token_for

RUN, EVENTS = 3, 400
INTO = "tmox42619jobs"  # where the jobs' results go


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster-jobs-data")
    generate_lcls2_run(root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{RUN:04d}.h5",
                       RUN, n_events=EVENTS, seed=3, chunk_events=20)
    return root


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """The one Dask scheduler every node's jobs run on, with two worker processes."""
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=None, scheduler_port=0) as dask:
        yield dask.scheduler_address


def node(data: Path, state_url: str, scheduler: str) -> LclstreamServer:
    return start_server(data, state_url=state_url, dask_scheduler=scheduler,
                        **{**CLUSTER, **JOB_SETTINGS})


@pytest.fixture
def state_url(postgres: Postgres) -> str:
    """A database of the test's own: no job of another test counts against its limits."""
    return postgres.database()


@pytest.fixture
def three(data: Path, state_url: str, scheduler: str) -> Iterator[list[LclstreamServer]]:
    nodes = [node(data, state_url, scheduler) for _ in range(3)]
    for n in nodes:
        wait_until(lambda n=n: len(n.node.alive()) == 3)
    yield nodes
    for n in nodes:
        n.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another site's server, whose live streams the mirror jobs follow."""
    root = tmp_path_factory.mktemp("cluster-jobs-source")
    server = start_server(root, jobs_database=root / "jobs.sqlite")
    yield location(server)
    server.shutdown()


def follow(at: Client, source: str, stream: str) -> str:
    """A job following `stream` of the source into INTO: the job's id."""
    [job] = at.mirror(source, LCLS2_EXP, stream=stream, into=INTO, source_token=admin_token())
    return job.id


def running_on(nodes: list[LclstreamServer], at: Client, job: str) -> LclstreamServer:
    status = wait_until(lambda: (s := at.job(job).status()) and s["state"] == "running" and s)
    return next(n for n in nodes if n.node.id == status["node"])


def members(at_source: Client, stream: str, job: str) -> int:
    """How many followers the mirror job has in its group at the source."""
    [listed] = [s for s in at_source.streams(LCLS2_EXP) if s["stream"] == stream]
    return next(g["members"] for g in listed["groups"] if g["group"] == f"mirror-{job}")


def stored(at: Client, stream: str, n: int) -> list[int]:
    """The first `n` events' indices in the job's stream (read wherever its owner is), once
    it holds them."""
    wait_until(lambda: any(s["stream"] == stream and s["events"] >= n
                           for s in at.streams(INTO)), timeout=60)
    got: list[int] = []
    with at.subscribe(INTO, stream) as sub:
        for batch in sub:
            got += indices([batch])
            if len(got) >= n:
                break
    return got


def test_a_job_submitted_to_any_node_runs_once_on_the_shared_scheduler(three,
                                                                        scheduler) -> None:
    a, b, c = (location(n) for n in three)
    with connect(a) as at_a, connect(b) as at_b, connect(c) as at_c:
        expected = at_a.read(LCLS2_EXP, RUN, ["gmd/energy", "ebeam/photon_energy"])
        jobs = [at.submit(LCLS2_EXP, RUN, ["gmd/energy", "ebeam/photon_energy"],
                          into=(INTO, f"copy-{i}")) for i, at in enumerate((at_a, at_b, at_c))]
        done = [job.wait(progress=False) for job in jobs]
        for status in done:
            assert status["state"] == "completed", status
            assert status["attempt"] == 1 and status["node"] in {n.node.id for n in three}
            assert scheduler in status["transitions"][1]["reason"]  # the shared one
            # every node answers alike (the table is shared)
            assert at_c.job(status["job"]).status()["transitions"] == status["transitions"]
            result = at_b.read(INTO, status["run"])
            assert result.select(expected.schema.names).equals(expected)
        listed = {j["job"] for j in at_b.jobs()}
        assert {s["job"] for s in done} <= listed
    # another user, at any node: the jobs are not theirs to see or cancel
    bob = token_for("bob", read=(LCLS2_EXP,), write=(INTO,))
    with connect(c, bob) as as_bob:
        for status in done:
            with pytest.raises(pa.ArrowKeyError, match="no job"):
                as_bob.job(status["job"]).status()
            with pytest.raises(pa.ArrowKeyError, match="no job"):
                as_bob.job(status["job"]).cancel()
        assert as_bob.jobs() == []


def test_a_job_is_cancelled_from_a_node_that_does_not_run_it(three, source) -> None:
    with connect(source) as at_source, connect(location(three[0])) as at_a:
        producer = at_source.producer(LCLS2_EXP, "endless")
        producer.send(events(0))
        producer.flush()
        job = follow(at_a, source, "endless")
        runner = running_on(three, at_a, job)
        assert stored(at_a, "endless", 10) == list(range(10))
        other = next(n for n in three if n is not runner)
        with connect(location(other)) as elsewhere:
            status = elsewhere.job(job).cancel()  # answers once the running node stopped it
            assert status["state"] == "cancelled", status
            assert f"cancelled by {status['owner']}" in status["transitions"][-1]["reason"]
            # its follower leaves the source's group, and nothing more reaches the stream
            wait_until(lambda: members(at_source, "endless", job) == 0)
            producer.send(events(10))
            producer.flush()
        with connect(location(runner)) as owner:
            [listed] = [s for s in owner.streams(INTO) if s["stream"] == "endless"]
            assert listed["events"] == 10
        producer.close()


def test_a_job_on_a_node_that_goes_is_resumed_by_another(three, source, data, state_url,
                                                         scheduler) -> None:
    """The running node stops without a word (its jobs stay `running` in the table); another
    node finds the job orphaned once the node's heartbeats stop, queues it again and resumes
    it after what the stream holds: every event once, in order."""
    with connect(source) as at_source, connect(location(three[0])) as at_a:
        producer = at_source.producer(LCLS2_EXP, "handed-over")
        for i in range(3):
            producer.send(events(i * 10))
        producer.flush()
        job = follow(at_a, source, "handed-over")
        runner = running_on(three, at_a, job)
        assert stored(at_a, "handed-over", 30) == list(range(30))
        index = three.index(runner)
        runner.shutdown()
        three[index] = node(data, state_url, scheduler)  # for the teardown; a new node id
        survivor = next(n for n in three if n is not runner)
        with connect(location(survivor)) as at:
            resumed = wait_until(lambda: (s := at.job(job).status()) and s["attempt"] == 2
                                 and s["state"] == "running" and s, timeout=30)
            assert resumed["node"] != runner.node.id
            assert any("stopped heartbeating" in t["reason"] for t in resumed["transitions"])
            for i in range(3, 6):
                producer.send(events(i * 10))
            producer.end_run()
            done = at.job(job).wait(progress=False)
            assert done["state"] == "completed", done
            assert indices(at.read(INTO, done["run"]).to_batches()) == list(range(60))


def test_without_the_database_jobs_wait_and_go_on(three, source, postgres) -> None:
    with connect(source) as at_source, connect(location(three[1])) as at_b:
        producer = at_source.producer(LCLS2_EXP, "through-outage")
        producer.send(events(0))
        producer.flush()
        job = follow(at_b, source, "through-outage")
        running_on(three, at_b, job)
        assert stored(at_b, "through-outage", 10) == list(range(10))
        postgres.stop()
        try:
            with pytest.raises(flight.FlightUnavailableError, match="unreachable"):
                at_b.submit(LCLS2_EXP, RUN, ["gmd/energy"], into=(INTO, "refused"))
            with pytest.raises(flight.FlightUnavailableError, match="unreachable"):
                at_b.job(job).status()
            [answer] = at_b._flight.do_action(flight.Action("health", b""))
            health = json.loads(answer.body.to_pybytes())  # serving on, and saying why not
            assert health["status"] == "ok" and health["jobs"] is None
            assert "unreachable" in health["jobs_unavailable"]
            wait_until(lambda: all(n.node.fenced for n in three))
            producer.send(events(10))  # arrives at the source meanwhile
            producer.flush()
        finally:
            postgres.start()
        # the node that let the job go (or another) queues it again; it resumes after what
        # the stream holds
        for i in range(2, 4):
            producer.send(events(i * 10))
        producer.end_run()
        done = at_b.job(job).wait(progress=False)
        assert done["state"] == "completed", done
        assert any("lost the cluster's state" in t["reason"] or "stopped heartbeating" in
                   t["reason"] for t in done["transitions"]), done["transitions"]
        assert indices(at_b.read(INTO, done["run"]).to_batches()) == list(range(40))


def test_many_jobs_over_three_nodes_each_start_once(three) -> None:
    """Three nodes race for one queue: each job starts once."""
    with connect(location(three[2])) as at:
        jobs = [at.submit(LCLS2_EXP, RUN, ["gmd/energy"], into=(INTO, f"many-{i}"))
                for i in range(8)]  # the per-user limit: 8
        done = [job.wait(progress=False) for job in jobs]
    assert [s["state"] for s in done] == ["completed"] * 8
    assert all(s["attempt"] == 1 for s in done)
    assert len({s["run"] for s in done}) == 8
    assert pa.array([s["progress"]["events"] for s in done]).to_pylist() == [EVENTS] * 8


@pytest.mark.slow  # two nodes in processes of their own: ~15 s
def test_a_job_on_a_node_killed_with_sigkill_resumes_elsewhere(data, state_url, scheduler,
                                                               source) -> None:
    procs = [serve(data, state_url, "--dask-scheduler", scheduler) for _ in range(2)]
    try:
        with connect(source) as at_source:
            producer = at_source.producer(LCLS2_EXP, "killed")
            for i in range(3):
                producer.send(events(i * 10))
            producer.flush()
            with connect(procs[0][1]) as at:
                job = follow(at, source, "killed")
                running = wait_until(lambda: (s := at.job(job).status())["state"] == "running"
                                     and s)
                victim = next(p for p, where in procs
                              if running["node"].startswith(where + "#"))
                survivor = next(where for p, where in procs if p is not victim)
                assert stored(at, "killed", 30) == list(range(30))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            with connect(survivor) as at:
                resumed = wait_until(lambda: (s := at.job(job).status())["attempt"] == 2
                                     and s["state"] == "running" and s, timeout=60)
                assert resumed["node"].startswith(survivor + "#")
                for i in range(3, 6):
                    producer.send(events(i * 10))
                producer.end_run()
                done = at.job(job).wait(progress=False, timeout=120)
                assert done["state"] == "completed", done
                assert indices(at.read(INTO, done["run"]).to_batches()) == list(range(60))
    finally:
        for proc, _ in procs:
            interrupt(proc)
