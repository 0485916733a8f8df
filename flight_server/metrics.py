"""Prometheus metrics and health: what operators and load balancers read from a server.

One `Metrics` per server, with a `CollectorRegistry` of its own (never prometheus_client's
global one: several servers in one process, as in the tests, keep separate counts). The RPC
counters are fed by the auth middleware, which sees every call, refused ones included; the
state of live streams and the job table is read when Prometheus scrapes (custom collectors), so
that nothing is updated per batch that nobody reads.

`MetricsServer` serves `/metrics` (Prometheus text format, prometheus_client's own WSGI app)
and `/healthz` (JSON; 503 while the server shuts down, so that a load balancer stops sending it
calls before they would be refused) on `--metrics-port`, beside the Flight port.

The bottom layer: it imports nothing of the project's, so that every part can report to it.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pyarrow as pa
import pyarrow.flight as flight
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# No `<counter>_created` series beside each counter and histogram: they double what a scrape
# carries and Prometheus ignores them (a process-wide switch of prometheus_client).
disable_created_metrics()

# From a cheap action to a long download; a live subscription lasts as long as its consumer.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0, 300.0, 1800.0, 3600.0)
SQL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               120.0, 300.0, 900.0)
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0,
               12 * 3600.0, 24 * 3600.0)
STREAM_KINDS = (("DoGet", "archive"), ("DoGet", "live"), ("DoGet", "sql"), ("DoPut", "live"))

# The gRPC status a Flight server method's exception reaches the client with (the classes
# pyarrow maps, most specific first), named as gRPC names it.
_STATUSES: tuple[tuple[type[BaseException], str], ...] = (
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
    (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightCancelledError, "CANCELLED"),
    (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightUnavailableError, "UNAVAILABLE"),
    (flight.FlightInternalError, "INTERNAL"),
    (flight.FlightServerError, "UNKNOWN"),
    (pa.ArrowNotImplementedError, "UNIMPLEMENTED"),
    (pa.ArrowKeyError, "NOT_FOUND"),
    (pa.ArrowIndexError, "OUT_OF_RANGE"),
    (pa.ArrowInvalid, "INVALID_ARGUMENT"),
    (pa.ArrowTypeError, "INVALID_ARGUMENT"),
    (pa.ArrowMemoryError, "RESOURCE_EXHAUSTED"),
    (pa.ArrowCancelled, "CANCELLED"),
)


def status_name(exception: BaseException | None) -> str:
    """The Flight (gRPC) status name of a call that ended with `exception`: OK for None."""
    if exception is None:
        return "OK"
    for cls, name in _STATUSES:
        if isinstance(exception, cls):
            return name
    return "UNKNOWN"


def method_name(method: flight.FlightMethod) -> str:
    """FlightMethod.DO_GET -> "DoGet": the RPC as the Flight protocol names it."""
    return "".join(part.capitalize() for part in method.name.split("_"))


class _Scraped(Collector):
    """A collector whose families are computed at scrape time by `collect_fn`. A failure (a
    store closed during shutdown, say) leaves its families out of that scrape: /metrics keeps
    answering."""

    def __init__(self, name: str, collect_fn: Callable[[], Iterable[Metric]]) -> None:
        self.name = name
        self.collect_fn = collect_fn

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self.collect_fn())
        except Exception as exc:
            log.warning("metrics: %s left out of this scrape: %s", self.name, exc)
            return iter(())
        return iter(families)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed per scrape: nothing to check for clashes at registration


class Metrics:
    """Every metric of one server. Thread-safe: gRPC threads, stream generators and the job
    runner report concurrently."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.state = "starting"  # then "ok" while it serves, "stopping" once it shuts down
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpcs = Counter("lclstream_rpc", "Flight RPCs completed, by method and status "
                            "(refused ones included)", ["method", "status"], registry=r)
        self.rpc_seconds = Histogram("lclstream_rpc_duration_seconds",
                                     "Flight RPC duration, from its headers to its last "
                                     "message (a stream's whole length)", ["method"],
                                     buckets=RPC_BUCKETS, registry=r)
        self.actions = Counter("lclstream_actions", "DoAction calls by action type and status",
                               ["action", "status"], registry=r)
        self.sent_bytes = Counter("lclstream_sent_bytes", "Arrow bytes of the record batches "
                                  "sent (before wire compression)", ["method"], registry=r)
        self.received_bytes = Counter("lclstream_received_bytes", "Arrow bytes of the record "
                                      "batches received", ["method"], registry=r)
        self.active = Gauge("lclstream_active_streams", "Data streams open now: DoGet of an "
                            "archived run, a live stream or a SQL result; DoPut of a live "
                            "stream's producer", ["method", "kind"], registry=r)
        self._active: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        for method, kind in STREAM_KINDS:
            self.active.labels(method, kind)
            self._active[(method, kind)] = 0
        self.sql_seconds = Histogram("lclstream_sql_query_duration_seconds",
                                     "SQL query duration, from DoGet to its last result batch",
                                     buckets=SQL_BUCKETS, registry=r)
        self.sql_cancelled = Counter("lclstream_sql_cancelled",
                                     "SQL queries stopped before their end: 'client' (cancelled "
                                     "or gone), 'timeout' (past sql_timeout)", ["reason"],
                                     registry=r)
        for reason in ("client", "timeout"):
            self.sql_cancelled.labels(reason)
        self.job_seconds = Histogram("lclstream_job_duration_seconds",
                                     "Jobs that reached a final state: from start (submission, "
                                     "for one cancelled in the queue) to the end",
                                     ["state"], buckets=JOB_BUCKETS, registry=r)
        info = Gauge("lclstream_build_info", "The server's version (always 1)",
                     ["version", "python", "pyarrow"], registry=r)
        info.labels(version, ".".join(map(str, sys.version_info[:3])), pa.__version__).set(1)
        Gauge("lclstream_start_time_seconds", "When the server started (Unix time)",
              registry=r).set(self.started)
        up = Gauge("lclstream_up", "1 while the server serves; 0 while it starts or shuts down",
                   registry=r)
        up.set_function(lambda: 1.0 if self.state == "ok" else 0.0)
        self._jobs: Callable[[], Mapping[str, int]] | None = None

    def serving(self) -> None:
        self.state = "ok"

    def stopping(self) -> None:
        self.state = "stopping"

    # -- calls (from the auth middleware) ----------------------------------------------------

    def call_completed(self, method: str, exception: BaseException | None, seconds: float,
                       action: str | None = None) -> None:
        status = status_name(exception)
        self.rpcs.labels(method, status).inc()
        self.rpc_seconds.labels(method).observe(seconds)
        if action is not None:
            self.actions.labels(action, status).inc()

    def sent(self, method: str) -> Callable[[float], None]:
        """The increment of bytes sent for calls of `method` (looked up once per call)."""
        return self.sent_bytes.labels(method).inc

    def received(self, method: str) -> Callable[[float], None]:
        return self.received_bytes.labels(method).inc

    def stream_opened(self, method: str, kind: str) -> None:
        with self._lock:
            self._active[(method, kind)] = self._active.get((method, kind), 0) + 1
        self.active.labels(method, kind).inc()

    def stream_closed(self, method: str, kind: str) -> None:
        with self._lock:
            self._active[(method, kind)] -= 1
        self.active.labels(method, kind).dec()

    def streams_active(self) -> int:
        with self._lock:
            return sum(self._active.values())

    # -- SQL, jobs ---------------------------------------------------------------------------

    def sql_query(self, seconds: float, cancelled: str | None = None) -> None:
        """A query's results ended after `seconds`; `cancelled`: why it stopped early."""
        self.sql_seconds.observe(seconds)
        if cancelled is not None:
            self.sql_cancelled.labels(cancelled).inc()

    def job_finished(self, state: str, started: float | None, created: float,
                     finished: float | None) -> None:
        end = finished if finished is not None else time.time()
        begin = started if started is not None else created
        self.job_seconds.labels(state).observe(max(end - begin, 0.0))

    def watch_jobs(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """`counts()`: jobs per state, read at each scrape (and by `health`)."""
        self._jobs = counts

        def collect() -> Iterator[Metric]:
            family = GaugeMetricFamily("lclstream_jobs", "Jobs in the job table by state",
                                       labels=["state"])
            for state, n in counts().items():
                family.add_metric([state], n)
            yield family

        self.registry.register(_Scraped("jobs", collect))

    def watch_live(self, streams: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        """`streams()`: every live stream's `describe()`, with `ingested_events` and
        `ingested_bytes` (since this server started), read at each scrape."""

        def collect() -> Iterator[Metric]:
            labels = ["experiment", "stream"]
            events = CounterMetricFamily(
                "lclstream_live_ingested_events", "Events producers stored into the stream "
                "since the server started", labels=labels)
            nbytes = CounterMetricFamily(
                "lclstream_live_ingested_bytes", "Bytes (Arrow IPC, as stored) producers "
                "stored into the stream since the server started", labels=labels)
            held = GaugeMetricFamily("lclstream_live_stored_bytes",
                                     "Bytes of the stream's log on disk", labels=labels)
            producers = GaugeMetricFamily("lclstream_live_producers",
                                          "Producers connected to the stream", labels=labels)
            consumers = GaugeMetricFamily("lclstream_live_consumers",
                                          "Consumers subscribed to the stream", labels=labels)
            lag = GaugeMetricFamily("lclstream_live_consumer_lag_events",
                                    "Events stored that the consumer group has not committed",
                                    labels=[*labels, "group"])
            for s in streams():
                key = [s["experiment"], s["stream"]]
                events.add_metric(key, s["ingested_events"])
                nbytes.add_metric(key, s["ingested_bytes"])
                held.add_metric(key, s["bytes_on_disk"])
                producers.add_metric(key, s["producers"])
                consumers.add_metric(key, s["consumers"])
                for group in s["groups"]:
                    lag.add_metric([*key, group["group"]], group["lag"])
            yield from (events, nbytes, held, producers, consumers, lag)

        self.registry.register(_Scraped("live streams", collect))

    def watch_cluster(self, alive: Callable[[], int], state_ok: Callable[[], bool]) -> None:
        """A cluster node: the nodes it saw alive at its last heartbeat, and whether that
        heartbeat reached the shared state."""

        def collect() -> Iterator[Metric]:
            yield GaugeMetricFamily("lclstream_cluster_nodes_alive",
                                    "Nodes alive at this node's last heartbeat (itself included)",
                                    value=alive())
            yield GaugeMetricFamily("lclstream_cluster_state_reachable",
                                    "1 if this node's last heartbeat reached the cluster's "
                                    "PostgreSQL state, else 0", value=int(state_ok()))

        self.registry.register(_Scraped("cluster", collect))

    # -- health ------------------------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self._started_monotonic

    def health(self, full: bool = True) -> dict[str, Any]:
        """The `health` action's answer (`full`), or /healthz's (cheap: no job table read)."""
        body: dict[str, Any] = {"status": self.state, "version": self.version,
                                "uptime_s": round(self.uptime(), 3)}
        if full:
            body["streams_active"] = self.streams_active()
            try:
                body["jobs"] = dict(self._jobs()) if self._jobs is not None else {}
            except Exception as exc:  # a cluster's job table is away: the server serves on
                body["jobs"] = None
                body["jobs_unavailable"] = str(exc)
        return body


class _QuietHandler(WSGIRequestHandler):
    """No access line per request: Prometheus scrapes every few seconds, for months."""

    timeout = 30  # seconds a connection may stay silent: a stalled client's thread ends

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """`/metrics` and `/healthz` over HTTP (HTTPS with the server's own certificate when it
    has one) on a thread of their own."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.metrics = metrics
        self._scrape = make_wsgi_app(metrics.registry)
        family, address = _best_family(host.strip("[]"), port)

        class Server(ThreadingWSGIServer):
            address_family = family

            def handle_error(self, request: Any, client_address: Any) -> None:
                # a client that went away, or spoke plain HTTP to HTTPS: its own business
                log.debug("metrics: request from %s failed", client_address, exc_info=True)

        self._httpd = make_server(address, port, self._app, Server, handler_class=_QuietHandler)
        self.tls = tls is not None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            # The handshake on the request's own thread (at its first read), not in the accept
            # loop, where one client that never completes it would hold up every scrape.
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    def url(self, host: str) -> str:
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path.rstrip("/") == "/healthz":
            body = json.dumps(self.metrics.health(full=False)).encode()
            status = "200 OK" if self.metrics.state == "ok" else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/", "/metrics"):
            return self._scrape(environ, start_response)
        body = b"not found: this server answers /metrics and /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", str(len(body)))])
        return [body]


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """IPv4 or IPv6, as the host is written (http.server would bind IPv4 only)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, address[0]
