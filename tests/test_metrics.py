"""Prometheus metrics and health: a real server on loopback with `metrics_port=0`, read with
real clients, its /metrics scraped over HTTP and parsed with prometheus_client's own parser.

Counts are compared before and after what a test does, so the tests do not depend on each
other. The server counts a call when gRPC reports it complete, which can be a moment after the
client has its last batch: counts are awaited (`eventually`), never assumed at once.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import Client, connect
from flight_server import config
from flight_server.generator import generate_lcls2_run
from flight_server.metrics import Metrics, MetricsServer
from flight_server.security import certs
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import (
    LCLS2_EXP,
    LCLSTREAM,
    cli_env,
    events,
    interrupt,
    raw_client,
    start_server,
    wait_for_location,
)

RUN, RUN_EVENTS = 7, 120
Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def metrics_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metrics-data")
    generate_lcls2_run(root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{RUN:04d}.h5",
                       RUN, n_events=RUN_EVENTS, seed=7)
    return root


@pytest.fixture(scope="module")
def server(metrics_root: Path) -> Iterator[LclstreamServer]:
    # No job ever starts (jobs_running=0): the job tests need the table, not a Dask cluster.
    srv = start_server(metrics_root, metrics_port=0, jobs_running=0, batch_bytes=256 * 1024,
                       first_batch_bytes=32 * 1024, partition_bytes=1024 * 1024)
    yield srv
    srv.shutdown()


@pytest.fixture
def client(server: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{server.port}") as c:
        yield c


def url(server: LclstreamServer, path: str) -> str:
    assert server.metrics_server is not None
    return f"http://127.0.0.1:{server.metrics_server.port}{path}"


def scrape(server: LclstreamServer) -> Samples:
    """Every sample of one scrape, by (name, labels); the whole text must parse."""
    with urllib.request.urlopen(url(server, "/metrics"), timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the metrics did not get there in time")
        time.sleep(0.02)


def delta(server: LclstreamServer, before: Samples, name: str, **labels: str) -> float:
    return value(scrape(server), name, **labels) - value(before, name, **labels)


def read_endpoint(c: flight.FlightClient, ticket: flight.Ticket) -> pa.Table:
    return c.do_get(ticket).read_all()


# -- RPCs --------------------------------------------------------------------------------------


def test_rpcs_are_counted_by_method_and_status(server: LclstreamServer) -> None:
    before = scrape(server)
    c = raw_client(server.port)
    info = c.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, str(RUN)))
    ticket = info.endpoints[0].ticket
    read = sum(read_endpoint(c, ticket).nbytes for _ in range(3))
    with pytest.raises(flight.FlightUnauthenticatedError):  # refused before any RPC method runs
        list(raw_client(server.port, token="not-a-token").list_flights())
    with pytest.raises(pa.ArrowKeyError):
        c.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, "999"))
    other = server.security.minter.mint("outsider", Grants.build(read=["cxi*"]), 600)
    with pytest.raises(flight.FlightUnauthorizedError):
        read_endpoint(raw_client(server.port, token=other), ticket)
    with pytest.raises(pa.ArrowInvalid):
        list(c.do_action(flight.Action("no-such-action", b"")))
    c.close()

    eventually(lambda: delta(server, before, "lclstream_rpc_total", method="DoGet",
                             status="OK") == 3)
    after = scrape(server)

    def d(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert d("lclstream_rpc_total", method="GetFlightInfo", status="OK") == 1
    assert d("lclstream_rpc_total", method="GetFlightInfo", status="NOT_FOUND") == 1
    assert d("lclstream_rpc_total", method="ListFlights", status="UNAUTHENTICATED") == 1
    assert d("lclstream_rpc_total", method="DoGet", status="PERMISSION_DENIED") == 1
    assert d("lclstream_rpc_total", method="DoAction", status="INVALID_ARGUMENT") == 1
    assert d("lclstream_actions_total", action="unknown", status="INVALID_ARGUMENT") == 1
    # every call observed in the latency histogram, refused ones too
    assert d("lclstream_rpc_duration_seconds_count", method="DoGet") == 4
    assert d("lclstream_rpc_duration_seconds_count", method="ListFlights") == 1
    assert d("lclstream_rpc_duration_seconds_sum", method="DoGet") > 0
    assert d("lclstream_sent_bytes_total", method="DoGet") >= read > 0
    assert value(after, "lclstream_active_streams", method="DoGet", kind="archive") == 0


def test_build_info_start_time_and_up(server: LclstreamServer) -> None:
    samples = scrape(server)
    [(name, labels)] = [k for k in samples if k[0] == "lclstream_build_info"]
    assert dict(labels)["version"] == server.metrics.version and samples[(name, labels)] == 1
    started = value(samples, "lclstream_start_time_seconds")
    assert started == pytest.approx(server.metrics.started) and started <= time.time()
    assert value(samples, "lclstream_up") == 1


# -- live streams ------------------------------------------------------------------------------


def test_live_ingest_active_streams_and_consumer_lag(server: LclstreamServer,
                                                     client: Client) -> None:
    before = scrape(server)
    sent = 0
    with client.producer(LCLS2_EXP, "monitored") as producer:
        for i in range(5):
            batch = events(10 * i)
            sent += batch.nbytes
            producer.send(batch)
        producer.flush()
        samples = scrape(server)
        assert value(samples, "lclstream_active_streams", method="DoPut", kind="live") == \
            value(before, "lclstream_active_streams", method="DoPut", kind="live") + 1
        assert value(samples, "lclstream_live_producers", experiment=LCLS2_EXP,
                     stream="monitored") == 1

        sub = client.subscribe(LCLS2_EXP, "monitored", group="analysis")
        got = 0
        for batch in sub:
            got += batch.num_rows
            if got >= 20:
                break
        sub.commit()  # two batches of five done: 30 events to go
        samples = scrape(server)
        assert value(samples, "lclstream_active_streams", method="DoGet", kind="live") == 1
        labels = {"experiment": LCLS2_EXP, "stream": "monitored"}
        assert value(samples, "lclstream_live_ingested_events_total", **labels) == 50
        assert value(samples, "lclstream_live_ingested_bytes_total", **labels) > 0
        assert value(samples, "lclstream_live_stored_bytes", **labels) > 0
        assert value(samples, "lclstream_live_consumers", **labels) == 1
        lag = value(samples, "lclstream_live_consumer_lag_events", group="analysis", **labels)
        [group] = client.streams(LCLS2_EXP)[0]["groups"]
        assert lag == group["lag"] == 30
        sub.close()
    eventually(lambda: value(scrape(server), "lclstream_active_streams", method="DoGet",
                             kind="live") == 0)
    after = scrape(server)
    assert value(after, "lclstream_active_streams", method="DoPut", kind="live") == \
        value(before, "lclstream_active_streams", method="DoPut", kind="live")
    assert value(after, "lclstream_received_bytes_total", method="DoPut") - \
        value(before, "lclstream_received_bytes_total", method="DoPut") >= sent


# -- jobs --------------------------------------------------------------------------------------


def test_jobs_by_state_and_their_durations(server: LclstreamServer, client: Client) -> None:
    before = scrape(server)
    kept = client.submit(LCLS2_EXP, RUN, ["gmd/energy"], into=(LCLS2_EXP, "job-kept"))
    dropped = client.submit(LCLS2_EXP, RUN, ["gmd/energy"], into=(LCLS2_EXP, "job-dropped"))
    samples = scrape(server)
    assert value(samples, "lclstream_jobs", state="queued") == \
        value(before, "lclstream_jobs", state="queued") + 2
    assert (samples.keys() >= {("lclstream_jobs", frozenset({("state", s)}))
                               for s in ("running", "completed", "failed", "cancelled")})
    dropped.cancel()
    after = scrape(server)

    def d(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert d("lclstream_jobs", state="queued") == 1 and d("lclstream_jobs", state="cancelled") == 1
    assert d("lclstream_job_duration_seconds_count", state="cancelled") == 1
    assert d("lclstream_job_duration_seconds_sum", state="cancelled") >= 0
    assert d("lclstream_actions_total", action="submit", status="OK") == 2
    kept.cancel()


# -- SQL ---------------------------------------------------------------------------------------


def test_sql_query_time_and_cancellations(server: LclstreamServer, client: Client) -> None:
    before = scrape(server)
    table = client.sql(f'SELECT count(*) AS n, avg("gmd/energy") FROM {LCLS2_EXP}.events')
    assert table.column("n").to_pylist() == [RUN_EVENTS]
    eventually(lambda: delta(server, before, "lclstream_sql_query_duration_seconds_count") == 1)
    # A result of 1.7 M rows, of which the client reads one batch and goes away.
    batches = client.sql_batches(f"SELECT a.event FROM {LCLS2_EXP}.events a, "
                                 f"{LCLS2_EXP}.events b, {LCLS2_EXP}.events c")
    assert next(batches).num_rows > 0
    batches.close()
    eventually(lambda: delta(server, before, "lclstream_sql_cancelled_total",
                             reason="client") == 1)
    eventually(lambda: delta(server, before, "lclstream_sql_query_duration_seconds_count") == 2)
    assert delta(server, before, "lclstream_sql_cancelled_total", reason="timeout") == 0


# -- health ------------------------------------------------------------------------------------


def test_health_action_and_healthz(server: LclstreamServer, client: Client) -> None:
    c = raw_client(server.port)
    assert "health" in {a.type for a in c.list_actions()}
    [reply] = c.do_action(flight.Action("health", b""))
    health = json.loads(reply.body.to_pybytes())
    assert health["status"] == "ok" and health["version"] == server.metrics.version
    assert health["uptime_s"] > 0 and health["streams_active"] >= 0
    assert set(health["jobs"]) == {"queued", "running", "completed", "failed", "cancelled"}
    with client.producer(LCLS2_EXP, "held-open") as producer:
        producer.send(events(0))
    # a live subscription waits for more once it has what is stored: a stream held open,
    # which health counts (a DoGet of a small run may be sent whole before health is asked)
    with client.subscribe(LCLS2_EXP, "held-open") as sub:
        next(iter(sub))
        [reply] = c.do_action(flight.Action("health", b""))
        assert json.loads(reply.body.to_pybytes())["streams_active"] >= 1
    c.close()

    with urllib.request.urlopen(url(server, "/healthz"), timeout=10) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
        body = json.loads(reply.read())
    assert body["status"] == "ok" and body["version"] == server.metrics.version
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url(server, "/nothing-here"), timeout=10)
    assert missing.value.code == 404
    # no credentials: refused
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(flight.connect(f"grpc://127.0.0.1:{server.port}").do_action(
            flight.Action("health", b"")))


def test_healthz_is_503_while_the_server_shuts_down(tmp_path: Path) -> None:
    """A query whose client has stopped reading keeps gRPC's shutdown waiting: meanwhile
    /healthz says 503 (a load balancer stops sending calls) and lclstream_up is 0; once the
    server has stopped, nothing listens on the metrics port."""
    generate_lcls2_run(tmp_path / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0001.h5",
                       1, n_events=40, seed=1)
    srv = start_server(tmp_path, metrics_port=0)
    with urllib.request.urlopen(url(srv, "/healthz"), timeout=10) as reply:
        assert reply.status == 200
    closer = threading.Thread(target=srv.shutdown)
    with connect(f"grpc://127.0.0.1:{srv.port}") as c:
        joined = ", ".join(f"{LCLS2_EXP}.events e{i}" for i in range(5))  # 40^5 rows
        batches = c.sql_batches(f"SELECT e0.event FROM {joined}")
        next(batches)
        closer.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    urllib.request.urlopen(url(srv, "/healthz"), timeout=10).close()
                except urllib.error.HTTPError as exc:
                    assert exc.code == 503
                    assert json.loads(exc.read())["status"] == "stopping"
                    break
                assert time.monotonic() < deadline, "/healthz never said 503"
                time.sleep(0.02)
            samples = scrape(srv)
            assert value(samples, "lclstream_up") == 0
            assert value(samples, "lclstream_active_streams", method="DoGet", kind="sql") == 1
            assert closer.is_alive()
        finally:
            batches.close()
            closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url(srv, "/healthz"), timeout=10)


# -- under load, and several servers -----------------------------------------------------------


def test_metrics_endpoint_under_load(server: LclstreamServer) -> None:
    """Scrapes from several threads while several downloads run: every scrape parses, every
    download completes, and exactly the downloads made are counted."""
    before = scrape(server)
    c = raw_client(server.port)
    info = c.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, str(RUN)))
    c.close()
    readers, reads_each, done = 4, 2, threading.Event()
    rows: list[int] = []
    scrapes: list[int] = []
    errors: list[BaseException] = []

    def download() -> None:
        try:
            with raw_client(server.port) as mine:
                for _ in range(reads_each):
                    rows.append(sum(read_endpoint(mine, e.ticket).num_rows
                                    for e in info.endpoints))
        except BaseException as exc:
            errors.append(exc)

    def scraper() -> None:
        try:
            while not done.is_set():
                scrapes.append(len(scrape(server)))
                time.sleep(0.01)  # a Prometheus scraping very often, not a spin
        except BaseException as exc:
            errors.append(exc)

    scrapers = [threading.Thread(target=scraper) for _ in range(3)]
    downloads = [threading.Thread(target=download) for _ in range(readers)]
    for t in scrapers + downloads:
        t.start()
    for t in downloads:
        t.join(60)
    done.set()
    for t in scrapers:
        t.join(60)
    assert not errors, errors
    assert rows == [RUN_EVENTS] * readers * reads_each
    assert len(scrapes) >= 3 and all(n > 0 for n in scrapes)
    expected = readers * reads_each * len(info.endpoints)
    eventually(lambda: delta(server, before, "lclstream_rpc_total", method="DoGet",
                             status="OK") == expected)


def test_two_servers_in_one_process_count_apart(server: LclstreamServer,
                                                tmp_path: Path) -> None:
    (tmp_path / LCLS2_EXP).mkdir()
    other = start_server(tmp_path, metrics_port=0)
    try:
        assert other.metrics.registry is not server.metrics.registry
        assert other.metrics_server.port != server.metrics_server.port
        before = scrape(server)
        with raw_client(other.port) as c:
            for _ in range(2):
                list(c.do_action(flight.Action("health", b"")))
        eventually(lambda: value(scrape(other), "lclstream_rpc_total", method="DoAction",
                                 status="OK") == 2)
        assert delta(server, before, "lclstream_rpc_total", method="DoAction", status="OK") == 0
    finally:
        other.shutdown()


def test_a_tls_server_serves_its_metrics_over_https(tmp_path: Path) -> None:
    paths = certs.make(tmp_path / "certs")
    (tmp_path / "data" / LCLS2_EXP).mkdir(parents=True)
    srv = start_server(tmp_path / "data", metrics_port=0, tls_cert=paths["server_cert"],
                       tls_key=paths["server_key"])
    try:
        assert srv.metrics_server.url("127.0.0.1").startswith("https://")
        trusted = ssl.create_default_context(cafile=str(paths["ca"]))
        base = f"https://127.0.0.1:{srv.metrics_server.port}"
        with urllib.request.urlopen(base + "/healthz", context=trusted, timeout=10) as reply:
            assert json.loads(reply.read())["status"] == "ok"
        with urllib.request.urlopen(base + "/metrics", context=trusted, timeout=10) as reply:
            names = {f.name for f in text_string_to_metric_families(reply.read().decode())}
        assert "lclstream_up" in names
        with pytest.raises(OSError):  # plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_server.port}/healthz",
                                   timeout=10)
        stalled = socket.create_connection(("127.0.0.1", srv.metrics_server.port))
        try:  # a client that never completes its handshake holds up no one else
            with urllib.request.urlopen(base + "/healthz", context=trusted, timeout=10) as reply:
                assert reply.status == 200
        finally:
            stalled.close()
    finally:
        srv.shutdown()


def test_a_failing_collector_leaves_the_rest_of_the_scrape() -> None:
    """A part that cannot answer (the job table closed during shutdown, say) drops out of that
    scrape; /metrics still answers with everything else."""
    metrics = Metrics("test")

    def broken() -> dict[str, int]:
        raise RuntimeError("closed")

    metrics.watch_jobs(broken)
    metrics.call_completed("DoGet", None, 0.01)
    served = MetricsServer(metrics, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics") as reply:
            names = {f.name for f in text_string_to_metric_families(reply.read().decode())}
        assert "lclstream_rpc" in names and "lclstream_jobs" not in names
    finally:
        served.close()


# -- settings and the command line -------------------------------------------------------------


def test_metrics_port_setting() -> None:
    assert config.load(None, environ={}).metrics_port is None
    assert config.load(None, environ={"LCLSTREAM_METRICS_PORT": "9102"}).metrics_port == 9102
    assert config.load(None, {"metrics_port": 0},
                       environ={"LCLSTREAM_METRICS_PORT": "9102"}).metrics_port == 0
    with pytest.raises(ValueError, match="setting 'metrics_port' must be int"):
        config.load(None, environ={"LCLSTREAM_METRICS_PORT": "nine"})


def test_serve_prints_where_metrics_are_served(tmp_path: Path) -> None:
    (tmp_path / LCLS2_EXP).mkdir()
    env = cli_env(LCLSTREAM_JOBS_DATABASE=str(tmp_path / "jobs.sqlite"))
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(tmp_path), "--port", "0",
                             "--metrics-port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_location(proc)
        line = proc.stdout.readline()
        assert line.startswith("metrics at http://127.0.0.1:"), line
        base = re.match(r"metrics at (http://[\d.:]+)/metrics", line).group(1)
        with urllib.request.urlopen(base + "/healthz", timeout=10) as reply:
            assert json.loads(reply.read())["status"] == "ok"
        with urllib.request.urlopen(base + "/metrics", timeout=10) as reply:
            assert "lclstream_up 1.0" in reply.read().decode()
    finally:
        interrupt(proc)
