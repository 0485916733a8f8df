"""read_dask near the data: a Dask cluster whose workers run on the hosts of a cluster of
servers reads each partition on the worker on its endpoint's first node's host.

Linux routes all of 127.0.0.0/8 to loopback, so 127.0.0.2 and 127.0.0.3 stand for two machines:
a `dask worker` process listens on each, as do server nodes (one PostgreSQL as their state).
Nothing is mocked: where a partition was read is the worker the scheduler's task stream names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from distributed import Client as DaskClient
from distributed import get_task_stream

import clients.dask
from clients import connect
from clients.convert import to_pandas
from clients.dask import read_dask
from flight_server.generator import generate_lcls2_run
from flight_server.server import LclstreamServer
from tests.cluster.conftest import CLUSTER
from tests.cluster.postgres import Postgres
from tests.helpers import LCLS2_EXP, admin_token, interrupt, start_server

pytestmark = pytest.mark.slow  # PostgreSQL, a scheduler, two workers and server nodes: ~8 s

RUN = 5
COLUMNS = ["run", "timestamp", "gmd/energy", "pnccd/image"]
WORKER_HOSTS = ("127.0.0.2", "127.0.0.3")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("placement-data")
    generate_lcls2_run(root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{RUN:04d}.h5",
                       RUN, n_events=300, seed=5, chunk_events=20)
    return root


def _dask(module: str, *args: str, log: Path) -> subprocess.Popen:
    # Work stealing off: it may move a task off its preferred worker when that one is busy
    # (allow_other_workers), which would make the placement this test observes a matter of luck.
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}
    return subprocess.Popen([sys.executable, "-m", f"distributed.cli.{module}", *args,
                             "--no-dashboard"], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler on 127.0.0.1 and a one-thread worker (no nanny) on each of WORKER_HOSTS."""
    tmp = tmp_path_factory.mktemp("dask")
    info, log = tmp / "scheduler.json", tmp / "dask.log"
    procs = [_dask("dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                   "--scheduler-file", str(info), log=log)]
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        procs += [_dask("dask_worker", address, "--host", host, "--nthreads", "1",
                        "--no-nanny", log=log) for host in WORKER_HOSTS]
        with DaskClient(address, timeout=30) as dc:
            dc.wait_for_workers(len(WORKER_HOSTS), timeout=60)
        yield address
    finally:
        for p in procs:
            interrupt(p, timeout=15)


@pytest.fixture
def nodes(data: Path, postgres: Postgres, request) -> Iterator[list[str]]:
    """Server nodes on the hosts the test names (`indirect` parameter), over a database of their
    own; their locations, once each node's plans name them all."""
    state_url = postgres.database()
    servers: list[LclstreamServer] = []
    try:
        for host in request.param:
            servers.append(start_server(data, state_url=state_url, **CLUSTER, host=host))
        for srv in servers:
            deadline = time.monotonic() + 60
            while len(srv.node.alive()) < len(servers):
                assert time.monotonic() < deadline, "the nodes never saw each other"
                time.sleep(0.05)
        yield [f"grpc://{host}:{srv.port}" for host, srv in zip(request.param, servers,
                                                                 strict=True)]
    finally:
        for srv in servers:
            srv.shutdown()


def first_hosts(location: str) -> list[str]:
    """The host of each endpoint's first location, in the plan's order."""
    with connect(location) as c:
        endpoints = c.plan(LCLS2_EXP, RUN, COLUMNS).endpoints
    return [urlsplit(e.locations[0].uri.decode()).hostname for e in endpoints]


def assert_same_events(got: pd.DataFrame, location: str) -> None:
    with connect(location) as c:
        want = to_pandas(c.read(LCLS2_EXP, RUN, COLUMNS))
    got = got.reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns="pnccd/image"),
                                  want.drop(columns="pnccd/image"))
    assert all((a == b).all() for a, b in zip(got["pnccd/image"], want["pnccd/image"],
                                              strict=True))


def reads(task_stream) -> list[tuple[int, str]]:
    """(partition index, the host of the worker that read it) of each read the scheduler ran,
    in index order."""
    return sorted((r["key"][1], urlsplit(r["worker"]).hostname) for r in task_stream.data
                  if isinstance(r["key"], tuple)
                  and r["key"][0].startswith(f"lclstream-{LCLS2_EXP}-"))


@pytest.mark.parametrize("nodes", [WORKER_HOSTS], indirect=True)
def test_each_partition_is_read_on_its_nodes_host(scheduler, nodes) -> None:
    hosts = first_hosts(nodes[0])
    assert len(hosts) >= 4 and set(hosts) == set(WORKER_HOSTS)  # both nodes serve a share
    with DaskClient(scheduler) as dc:
        read_dask(nodes[0], LCLS2_EXP, RUN, COLUMNS, token=admin_token(), near_data=False)
        assert not dc.futures  # lazy when asked
    with DaskClient(scheduler) as dc, get_task_stream(client=dc) as ts:
        df = read_dask(nodes[0], LCLS2_EXP, RUN, COLUMNS, token=admin_token())
        assert df.npartitions == len(hosts) == len(dc.futures)  # small: submitted at once
        got = df.compute()
        means = df.groupby("run")["gmd/energy"].mean().compute()  # the frame as any other
    assert_same_events(got, nodes[0])
    assert reads(ts) == list(enumerate(hosts))  # each read once, on its node's host
    pd.testing.assert_series_equal(means, got.groupby("run")["gmd/energy"].mean())


@pytest.mark.parametrize("nodes", [(WORKER_HOSTS[0], "127.0.0.4")], indirect=True)
def test_a_partition_whose_host_has_no_worker_is_read_by_any(scheduler, nodes) -> None:
    hosts = first_hosts(nodes[0])
    assert set(hosts) == {WORKER_HOSTS[0], "127.0.0.4"}
    with DaskClient(scheduler) as dc, get_task_stream(client=dc) as ts:
        got = read_dask(nodes[0], LCLS2_EXP, RUN, COLUMNS, token=admin_token(),
                        near_data=True).compute()
    assert_same_events(got, nodes[0])
    where = reads(ts)
    assert [i for i, _ in where] == list(range(len(hosts)))  # each read once
    assert all(w == h for (_, w), h in zip(where, hosts, strict=True) if h == WORKER_HOSTS[0])
    assert {w for _, w in where} <= set(WORKER_HOSTS)


@pytest.mark.parametrize("nodes", [("127.0.0.4", "127.0.0.5")], indirect=True)
def test_with_no_worker_on_any_nodes_host_the_frame_stays_lazy(scheduler, nodes) -> None:
    with DaskClient(scheduler) as dc, get_task_stream(client=dc) as ts:
        df = read_dask(nodes[0], LCLS2_EXP, RUN, COLUMNS, token=admin_token(), near_data=True)
        assert not dc.futures  # nothing submitted: read when computed, by any worker
        got = df.compute()
    assert_same_events(got, nodes[0])
    assert len(reads(ts)) == df.npartitions == len(first_hosts(nodes[0]))


@pytest.mark.parametrize("nodes", [WORKER_HOSTS], indirect=True)
def test_a_request_too_big_for_the_workers_memory_stays_lazy(scheduler, nodes,
                                                             monkeypatch) -> None:
    """By default reads are placed (held in memory) only for a request that takes at most
    NEAR_DATA_SHARE of the workers' memory: here, as if that share were a few bytes."""
    monkeypatch.setattr(clients.dask, "NEAR_DATA_SHARE", 1e-9)
    with DaskClient(scheduler) as dc, get_task_stream(client=dc) as ts:
        df = read_dask(nodes[0], LCLS2_EXP, RUN, COLUMNS, token=admin_token())
        assert not dc.futures  # lazy: read as computed
        got = df.compute()
        placed = read_dask(nodes[0], LCLS2_EXP, RUN, COLUMNS, token=admin_token(),
                           near_data=True)  # asked for: placed whatever the size
        assert len(dc.futures) == placed.npartitions
    assert_same_events(got, nodes[0])
    assert len(reads(ts)) >= df.npartitions
