"""Three nodes over one data root and one PostgreSQL: plans spread endpoints over the live nodes
with a fallback each, any node opens any node's tickets, a node that stops leaves new plans,
clients read each endpoint where the plan says and fall back when a node goes, nodes with other
keys are refused, and a restarted database costs nothing but state changes meanwhile."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import connect
from clients.client import EndpointReader
from flight_server.cluster.state import ClusterError, ClusterState
from flight_server.cluster.users import UsersTable
from flight_server.generator import generate_lcls2_run
from flight_server.security.grants import Grants
from flight_server.security.users import UsersFile
from flight_server.server import LclstreamServer
from tests.cluster.conftest import CLUSTER, location, serve
from tests.cluster.postgres import Postgres
from tests.helpers import (
    LCLS2_EXP,
    events,
    free_port,
    indices,
    interrupt,
    run_cli,
    start_server,
    wait_until,
)

RUN, EVENTS = 5, 600


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster-data")
    generate_lcls2_run(root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{RUN:04d}.h5",
                       RUN, n_events=EVENTS, seed=5, chunk_events=20)
    return root


def node(data: Path, pg: Postgres, **settings) -> LclstreamServer:
    return start_server(data, state_url=pg.url, **{**CLUSTER, **settings})


@pytest.fixture
def three(cluster_data: Path, postgres: Postgres) -> Iterator[list[LclstreamServer]]:
    nodes = [node(cluster_data, postgres) for _ in range(3)]
    for n in nodes:  # each has seen the others
        wait_until(lambda n=n: len(n.node.alive()) == 3)
    yield nodes
    for n in nodes:
        n.shutdown()


def first_events(subscription, n: int) -> list[int]:
    """The indices of the first `n` events a subscription delivers."""
    got: list[int] = []
    with subscription as sub:
        for batch in sub:
            got += indices([batch])
            if len(got) >= n:
                return got
    return got


def uris(endpoint: flight.FlightEndpoint) -> list[str]:
    return [loc.uri.decode() for loc in endpoint.locations]


def test_a_plan_spreads_endpoints_over_the_nodes_with_a_fallback(three) -> None:
    nodes = {location(n) for n in three}
    with connect(location(three[0])) as c:
        info = c.plan(LCLS2_EXP, RUN)
        expected = c.read(LCLS2_EXP, RUN)
    assert len(info.endpoints) >= 6
    placed = [uris(e) for e in info.endpoints]
    assert all(len(p) == 2 and p[0] != p[1] and set(p) <= nodes for p in placed)
    assert {p[0] for p in placed} == nodes  # every node serves a share
    # any node plans alike: the same partition, the same node (its page cache stays warm)
    with connect(location(three[2])) as c:
        assert [uris(e) for e in c.plan(LCLS2_EXP, RUN).endpoints] == placed
    # each endpoint read where its plan says: a ticket sealed by node 0 opens on any node
    for endpoint in info.endpoints:
        first, fallback = uris(endpoint)
        for where in (first, fallback):
            with connect(where) as there:
                assert there._flight.do_get(endpoint.ticket).read_all().num_rows > 0
    with connect(location(three[1])) as c:  # the client reads each where the plan says
        assert c.read(LCLS2_EXP, RUN).equals(expected)
        assert set(c._nodes) == nodes - {location(three[1])}


def test_a_node_that_stops_leaves_new_plans(three, cluster_data, postgres) -> None:
    gone = location(three[2])
    three[2].shutdown()  # a clean stop leaves the state at once; the others see it next beat
    with connect(location(three[0])) as c:
        wait_until(lambda: all(gone not in uris(e) for e in c.plan(LCLS2_EXP, RUN).endpoints),
                   timeout=1.0)
    three[2] = node(cluster_data, postgres)  # for the fixture's teardown


def test_a_client_falls_back_when_a_node_goes_mid_read(cluster_data, postgres) -> None:
    """Two nodes in processes of their own: the one serving the first endpoint is killed after
    its first batch; the read goes on at the fallback, from the next event, and equals an
    uninterrupted read."""
    procs = [serve(cluster_data, postgres.url) for _ in range(2)]
    try:
        first_location = procs[0][1]
        with connect(first_location) as c:
            wait_until(lambda: len({u for e in c.plan(LCLS2_EXP, RUN).endpoints
                                    for u in uris(e)}) == 2)
            expected = c.read(LCLS2_EXP, RUN)
            info = c.plan(LCLS2_EXP, RUN)
            victim, victim_proc = procs[1][1], procs[1][0]  # not the node planning
            k = next(i for i, e in enumerate(info.endpoints) if uris(e)[0] == victim)
            batches = [b for e in info.endpoints[:k] for b in c.endpoint_reader(e)]
            reader = c.endpoint_reader(info.endpoints[k])
            batches.append(next(iter_ := iter(reader)))
            victim_proc.send_signal(signal.SIGKILL)
            victim_proc.wait()
            batches += list(iter_)
            assert reader.resumed >= 1
            # killed, it never said goodbye: it leaves new plans once its heartbeats stop
            started = time.monotonic()
            wait_until(lambda: all(victim not in uris(e)
                                   for e in c.plan(LCLS2_EXP, RUN).endpoints))
            assert time.monotonic() - started < 5
            rest = [b for e in info.endpoints[k + 1:] for b in c.endpoint_reader(e)]
        got = pa.Table.from_batches(batches + rest)
        assert got.equals(expected)
    finally:
        for proc, _ in procs:
            interrupt(proc)


def test_a_client_plans_elsewhere_when_its_node_is_killed(cluster_data, postgres) -> None:
    """The node a client plans at is killed: the client plans at another node an earlier plan
    named, and reads every event once (the killed node's endpoints from their fallbacks)."""
    procs = [serve(cluster_data, postgres.url) for _ in range(2)]
    try:
        home, other = procs[0][1], procs[1][1]
        with connect(home) as c:
            wait_until(lambda: {u for e in c.plan(LCLS2_EXP, RUN).endpoints
                                for u in uris(e)} == {home, other})
            expected = c.read(LCLS2_EXP, RUN)
            procs[0][0].send_signal(signal.SIGKILL)
            procs[0][0].wait()
            assert c.read(LCLS2_EXP, RUN).equals(expected)
        with connect(home) as stranger:  # knows no other node: says so
            with pytest.raises(flight.FlightUnavailableError,
                               match=f"no node could plan the request: {home}.*connect to"):
                stranger.plan(LCLS2_EXP, RUN)
    finally:
        for proc, _ in procs:
            interrupt(proc)


def test_every_location_down_is_a_clear_error(three) -> None:
    with connect(location(three[0])) as c:
        endpoint = c.plan(LCLS2_EXP, RUN).endpoints[0]
    dead = [f"grpc://127.0.0.1:{free_port()}" for _ in range(2)]
    nodes = [(where, flight.connect(where)) for where in dead]
    reader = EndpointReader(nodes[0][1], endpoint.ticket, patience=0.5, fallbacks=nodes)
    with pytest.raises(flight.FlightUnavailableError) as err:
        list(reader)
    message = str(err.value)
    assert "every location of the endpoint failed" in message
    assert all(where in message for where in dead)


def test_a_node_with_other_keys_is_refused_at_start(cluster_data, postgres, three,
                                                    tmp_path) -> None:
    with pytest.raises(ClusterError, match="differs from the cluster's"):
        node(cluster_data, postgres, state_dir=tmp_path / "other-keys")


def test_without_the_database_nodes_serve_on_and_recover(three, postgres) -> None:
    with connect(location(three[1])) as c:
        expected = c.read(LCLS2_EXP, RUN)
        postgres.stop()
        try:
            wait_until(lambda: not three[1].node.state_ok)
            info = c.plan(LCLS2_EXP, RUN)  # planned with the nodes last seen alive
            assert {u for e in info.endpoints for u in uris(e)} == {location(n) for n in three}
            assert c.read(LCLS2_EXP, RUN).equals(expected)
        finally:
            postgres.start()
        wait_until(lambda: all(n.node.state_ok for n in three))


def test_a_cluster_node_needs_the_state_url(cluster_data) -> None:
    with pytest.raises(ValueError, match="--state-url"):
        start_server(cluster_data, cluster=True)


def test_a_live_stream_is_served_by_its_owner_and_clients_follow(three) -> None:
    """The node a stream is first produced at owns it (recorded in the state); a producer or a
    subscriber at another node is told where it is and follows, and every event is there
    once, in order."""
    a, b, c = (location(n) for n in three)
    with connect(b) as at_b, connect(a) as at_a, connect(c) as at_c:
        with at_b.producer(LCLS2_EXP, "daq", producer_id="p1") as first:
            first.send(events(0))
        with at_c.producer(LCLS2_EXP, "daq", producer_id="p2") as second:  # follows to b
            second.send(events(10))
            second.flush()
            assert second._flight is at_c._nodes[b], (list(at_c._nodes), b)
        assert first_events(at_a.subscribe(LCLS2_EXP, "daq"), 20) == list(range(20))  # via b
        # any node lists the cluster's streams (each node describes those it owns)
        for at in (at_a, at_b, at_c):
            assert [(s["stream"], s["events"]) for s in at.streams()] == [("daq", 20)]
        at_c.end_run(LCLS2_EXP, "daq")  # at its owner
        assert at_a.streams()[0]["run"] is not None
        # started without a Dask scheduler to share, a cluster runs no jobs, and says so
        with pytest.raises(pa.ArrowNotImplementedError, match="share one Dask scheduler"):
            at_a.submit(LCLS2_EXP, RUN, ["gmd/energy"], into=(LCLS2_EXP, "x"))


def test_when_the_owner_goes_another_node_takes_the_stream_on(three, cluster_data,
                                                              postgres) -> None:
    a, b = location(three[0]), location(three[1])
    with connect(a) as at_a, connect(b) as at_b:
        producer = at_b.producer(LCLS2_EXP, "handover", producer_id="p")
        producer.send(events(0), seq=1)
        producer.flush()
        # a producer at node a follows to b
        via_a = at_a.producer(LCLS2_EXP, "handover", producer_id="p", reconnect_for=30)
        via_a.send(events(10), seq=2)
        via_a.flush()
        producer.close()
        three[1].shutdown()  # the owner leaves; its stream stays on the shared disk
        via_a.send(events(20), seq=3)  # back home, which takes the stream on from disk
        via_a.close()
        assert [s["stream"] for s in at_a.streams()] == ["handover"]
        assert first_events(at_a.subscribe(LCLS2_EXP, "handover"), 30) == list(range(30))
    three[1] = node(cluster_data, postgres)  # for the fixture's teardown


def test_without_the_state_no_stream_changes_owner(three, postgres) -> None:
    """The database away: streams a node holds go on for a while, no new stream gets an
    owner; away long enough that other nodes could take them on, the node lets go of its
    streams first. Back, the producer goes on and every event is there once."""
    a = three[0]
    with connect(location(a)) as at_a:
        producer = at_a.producer(LCLS2_EXP, "kept", producer_id="p", reconnect_for=60)
        producer.send(events(0), seq=1)
        producer.flush()
        postgres.stop()
        try:
            producer.send(events(10), seq=2)  # held here: goes on
            producer.flush()
            refused = at_a.producer(LCLS2_EXP, "new", reconnect_for=0.5)
            with pytest.raises(flight.FlightUnavailableError, match="state is unreachable"):
                refused.send(events(0))
                refused.close()
            wait_until(lambda: a.node.fenced)
            assert at_a.streams() == []  # let go, before anyone could take them on
        finally:
            postgres.start()
        producer.send(events(20), seq=3)  # waits for the state, then goes on
        producer.close()
        assert first_events(at_a.subscribe(LCLS2_EXP, "kept"), 30) == list(range(30))


def test_metrics_count_the_nodes_alive(cluster_data, postgres) -> None:
    with_metrics = node(cluster_data, postgres, metrics_port=0)
    try:
        url = with_metrics.metrics_server.url("127.0.0.1") + "/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples}
        assert values["lclstream_cluster_nodes_alive"] >= 1
        assert values["lclstream_cluster_state_reachable"] == 1
        with connect(location(with_metrics)) as c:
            [answer] = c._flight.do_action(flight.Action("health", b""))
        cluster = json.loads(answer.body.to_pybytes())["cluster"]
        assert cluster["location"] == location(with_metrics)
        assert location(with_metrics) in cluster["nodes_alive"]
        assert cluster["state_reachable"] is True and cluster["fenced"] is False
    finally:
        with_metrics.shutdown()


def test_a_node_must_advertise_a_location_of_its_own(cluster_data, postgres, three) -> None:
    taken = location(three[0])
    with pytest.raises(ClusterError, match="already serves at"):
        node(cluster_data, postgres, advertise=taken)
    with pytest.raises(ClusterError, match="must say where clients reach it"):
        node(cluster_data, postgres, host="0.0.0.0")


def test_nodes_started_together_make_the_state_once(postgres) -> None:
    with psycopg.connect(postgres.url, autocommit=True) as con:
        con.execute("CREATE DATABASE race")
    url = postgres.url.rsplit("/", 1)[0] + "/race"
    errors: list[BaseException] = []

    def start() -> None:
        try:
            ClusterState(url).create()
        except BaseException as exc:  # collected: the test says which
            errors.append(exc)

    starting = [threading.Thread(target=start) for _ in range(8)]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    assert errors == []


def test_the_command_line_says_what_a_cluster_node_lacks(cluster_data) -> None:
    done = run_cli("serve", "--data", str(cluster_data), "--port", "0", "--cluster")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: a cluster node needs the shared state: --state-url" in done.stderr


def test_password_users_are_the_clusters(three, postgres) -> None:
    """Users kept in the cluster's state: added once (`lclstream user add --state-url`), any
    node logs them in; removed once, no node does."""
    added = run_cli("user", "add", "carol", "--read", LCLS2_EXP, "--password-stdin",
                    "--state-url", postgres.url, input="correct horse battery\n")
    assert added.returncode == 0, added.stderr
    assert "the cluster's state (postgresql://lclstream@127.0.0.1" in added.stdout
    listed = run_cli("user", "list", "--state-url", postgres.url)
    assert f"carol\tread {LCLS2_EXP}" in listed.stdout
    for n in three:
        c = flight.connect(location(n))
        _, bearer = c.authenticate_basic_token("carol", "correct horse battery")
        options = flight.FlightCallOptions(headers=[(b"authorization", bearer)])
        [answer] = c.do_action(flight.Action("whoami", b""), options)
        assert json.loads(answer.body.to_pybytes())["subject"] == "carol"
        c.close()
    assert run_cli("user", "remove", "carol", "--state-url", postgres.url).returncode == 0
    c = flight.connect(location(three[2]))
    with pytest.raises(flight.FlightUnauthenticatedError):
        c.authenticate_basic_token("carol", "correct horse battery")
    c.close()


def test_a_clusters_first_node_takes_the_users_file_in(postgres, tmp_path) -> None:
    with psycopg.connect(postgres.url, autocommit=True) as con:
        con.execute("CREATE DATABASE adopt")
    state = ClusterState(postgres.url.rsplit("/", 1)[0] + "/adopt")
    state.create()
    single = UsersFile(tmp_path / "users.json")
    single.add("dave", "a long password", Grants(read=(LCLS2_EXP,)))
    table = UsersTable(state)
    assert table.adopt(single.path) == 1
    assert table.verify("dave", "a long password").grants == Grants(read=(LCLS2_EXP,))
    single.add("erin", "another long one", Grants())
    assert table.adopt(single.path) == 0  # once: the cluster's users are its own from then on
    assert table.verify("erin", "another long one") is None
