"""The Python client: list experiments and runs, read any columns of any runs as Arrow.

    >>> from clients import connect
    >>> c = connect("grpc://127.0.0.1:8815")
    >>> c.runs("tmox42619")                      # a Polars DataFrame
    >>> df = c.polars("tmox42619", 7, columns=["gmd/energy", "tof/waveforms"])
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from clients import convert, credentials, jobs, live, sql
from schemas import Request
from schemas import metadata as md
from schemas.errors import status_named_in
from schemas.live import owner_named_in
from schemas.request import EventSlice, compression_choice
from schemas.resume import read_progress, resume_ticket

log = logging.getLogger(__name__)

DEFAULT_LOCATION = "grpc://127.0.0.1:8815"

Runs = int | Iterable[int]
Events = slice | range | tuple[int, ...] | dict | None


def locations(endpoint: flight.FlightEndpoint) -> list[str]:
    """The URIs of the nodes an endpoint names, in the plan's order (none: the planning
    server's)."""
    return [loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri)
            for loc in endpoint.locations]


def _detailless(exc: Exception) -> Exception:
    """The server's message without pyarrow's appended transport detail, same exception type."""
    text = str(exc)
    for marker in (". Detail: ", ". gRPC client debug context"):
        text = text.split(marker, 1)[0]
    try:
        clean = type(exc)(text)
    except TypeError:
        return exc
    return clean


# GetSchema loses Flight error types in pyarrow, on both sides: the client raises OSError with
# the status only in its text (apache/arrow#43556), and the server sends a Flight error raised in
# get_schema as UNKNOWN, naming the Python exception (schemas/errors.py: the names are the
# contract). Map both back so that callers can catch by type.
_STATUS_DETAILS = {
    ". Detail: Unauthenticated": "UNAUTHENTICATED",
    ". Detail: Unauthorized": "PERMISSION_DENIED",
    ". Detail: Unavailable": "UNAVAILABLE",
    ". Detail: Internal": "INTERNAL",
    ". Detail: TimedOut": "DEADLINE_EXCEEDED",
    ". Detail: Cancelled": "CANCELLED",
}
_FLIGHT_ERRORS: dict[str, type[Exception]] = {
    "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
    "PERMISSION_DENIED": flight.FlightUnauthorizedError,
    "UNAVAILABLE": flight.FlightUnavailableError,
    "INTERNAL": flight.FlightInternalError,
    "DEADLINE_EXCEEDED": flight.FlightTimedOutError,
    "CANCELLED": flight.FlightCancelledError,
    "INVALID_ARGUMENT": pa.ArrowInvalid,
    "NOT_FOUND": pa.ArrowKeyError,
}


def _typed(exc: Exception) -> Exception:
    if isinstance(exc, flight.FlightError):
        return exc
    text = str(exc)
    status = status_named_in(text) or next(
        (s for marker, s in _STATUS_DETAILS.items() if marker in text), None)
    if status is None or isinstance(exc, _FLIGHT_ERRORS[status]):
        return exc
    return _FLIGHT_ERRORS[status](text.removeprefix("Unknown error: "))


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    try:
        yield
    except (flight.FlightError, pa.ArrowException, OSError) as exc:
        raise _detailless(_typed(exc)) from None


def _events(events: Events) -> EventSlice:
    if events is None:
        return EventSlice()
    if isinstance(events, EventSlice):
        return events
    if isinstance(events, slice | range):
        return EventSlice(events.start or 0, events.stop, events.step or 1)
    if isinstance(events, dict):
        return EventSlice(events.get("start") or 0, events.get("stop"), events.get("step") or 1)
    if isinstance(events, tuple) and 1 <= len(events) <= 3:
        return _events(slice(*events))
    raise TypeError(f"events must be a slice, range, (start, stop[, step]) or dict; got {events!r}")


def _runs(runs: Runs) -> tuple[int, ...]:
    return (int(runs),) if isinstance(runs, int | np.integer) else tuple(int(r) for r in runs)


def progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


class Client:
    """A connection to one LCLStream Flight server. Thread-safe; reuse it."""

    def __init__(self, location: str = DEFAULT_LOCATION, token: str | None = None, *,
                 tls_root_certs: Any = None, cert_chain: Any = None, private_key: Any = None,
                 **options: Any) -> None:
        self.location = location
        token = credentials.find_token(location, token)
        if token:
            credentials.check_not_expired(location, token)
            options["middleware"] = [*options.get("middleware", []),
                                     credentials.BearerToken(token)]
        options.update(credentials.tls_options(tls_root_certs, cert_chain, private_key))
        self._options = options
        self._flight = flight.connect(location, **options)
        # the other nodes a plan's endpoints name (a cluster), connected on first use, with
        # the same credentials
        self._nodes: dict[str, flight.FlightClient] = {}
        self._nodes_lock = threading.Lock()
        self._peers: list[str] = []  # the other nodes plans named: where to plan if ours is down

    def close(self) -> None:
        self._flight.close()
        with self._nodes_lock:
            for node in self._nodes.values():
                node.close()
            self._nodes.clear()

    def at(self, location: str) -> flight.FlightClient:
        """The connection to `location`: this client's own, or one made for it on first use."""
        if location == self.location or location.startswith(REUSE_CONNECTION):
            return self._flight
        with self._nodes_lock:
            if location not in self._nodes:
                self._nodes[location] = flight.connect(location, **self._options)
            return self._nodes[location]

    def endpoint_reader(self, endpoint: flight.FlightEndpoint, resume: bool = True,
                        start_from: int | None = None) -> EndpointReader:
        """A reader of one endpoint from the nodes its plan named, in order (the first that
        serves it, then its fallbacks), or from this client's server if it named none."""
        nodes = [(uri, self.at(uri)) for uri in locations(endpoint)] or [
            (self.location, self._flight)]
        return EndpointReader(nodes[0][1], endpoint.ticket, resume, start_from=start_from,
                              fallbacks=nodes)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalog -----------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """Who the server takes this connection to be: subject, issuer, grants, expiry."""
        with _clean_errors():
            results = list(self._flight.do_action(flight.Action("whoami", b"")))
        return json.loads(results[0].body.to_pybytes())

    def narrow_token(self, read: str | Iterable[str] = (), write: str | Iterable[str] = (),
                     admin: str | Iterable[str] = (), ttl: int | None = None) -> str:
        """A token with a subset of this connection's grants, for `ttl` seconds (default: the
        server's token lifetime) and never beyond this token's own expiry: hand a job or a
        colleague one experiment for an hour. A grant yours do not cover is PERMISSION_DENIED."""
        grants = {right: [globs] if isinstance(globs, str) else list(globs)
                  for right, globs in (("read", read), ("write", write), ("admin", admin))}
        body: dict[str, Any] = {"grants": {r: g for r, g in grants.items() if g}}
        if ttl is not None:
            body["ttl"] = ttl  # an integer: the server refuses anything else
        with _clean_errors():
            results = list(self._flight.do_action(
                flight.Action("narrow_token", json.dumps(body).encode())))
        return json.loads(results[0].body.to_pybytes())["token"]

    def experiments(self) -> list[str]:
        """Names of the experiments the server serves that this caller may read."""
        with _clean_errors():
            results = list(self._flight.do_action(flight.Action("experiments", b"")))
        return [e["experiment"] for e in json.loads(results[0].body.to_pybytes())]

    def runs(self, experiment: str):
        """The runs of an experiment as a Polars DataFrame: run, events, bytes, start/end time,
        layout, and source: null for a run's default form, "xtc2" for the raw form of a run
        whose default is its smalldata HDF5 file (read it with `source="xtc2"`)."""
        import polars as pl

        rows = []
        with _clean_errors():
            for info in self._flight.list_flights(experiment.encode()):
                meta = info.schema.metadata or {}
                if meta.get(md.EXPERIMENT, b"").decode() != experiment or md.LIVE in meta:
                    continue  # live streams are listed by `streams()`
                rows.append({
                    "run": int(meta[md.RUN]),
                    "events": int(meta[md.EVENTS]),
                    "bytes": int(meta.get(md.RUN_BYTES, info.total_bytes)),
                    "start_time": meta.get(md.START_TIME, b"").decode() or None,
                    "end_time": meta.get(md.END_TIME, b"").decode() or None,
                    "layout": meta.get(md.LAYOUT, b"").decode(),
                    "source": _source(info.descriptor),
                })
        schema = {"run": pl.Int64, "events": pl.Int64, "bytes": pl.Int64,
                  "start_time": pl.String, "end_time": pl.String, "layout": pl.String,
                  "source": pl.String}
        frame = pl.DataFrame(rows, schema=schema).sort("run", "source", nulls_last=False)
        return frame.with_columns(
            pl.col("start_time", "end_time").str.to_datetime(time_zone="UTC", time_unit="us")
        )

    # -- planning ----------------------------------------------------------------------------

    def request(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
                events: Events = None, *, filter: str | None = None,
                processing: Sequence[dict[str, Any]] | None = None,
                table: str | None = None, source: str | None = None,
                compression: str | None = None) -> Request:
        """The v1 request. `filter` keeps the events where a condition on scalar columns holds
        ("gmd/energy > 0.5 and evr/code_40 = 1"); `processing` lists steps the server applies
        before sending ([{"step": "roi", "column": "pnccd/image", "y": [0, 64], "x": [0, 64]}];
        see README "Filters and server-side processing"); `table` names one of the runs' other
        tables (a European XFEL detector's pulse-resolved frames, an NXmx run's "config"; the
        schema metadata key `lclstream.tables` lists them); `source="xtc2"` reads the raw
        LCLS-II runs where a smalldata HDF5 file of the same number is the default;
        `compression` ("zstd", "lz4", "zstd:LEVEL", "none") compresses the data on the wire
        (default: the server's, off on loopback and zstd elsewhere)."""
        cols = None if columns is None else tuple([columns] if isinstance(columns, str)
                                                  else columns)
        steps = None if processing is None else tuple(dict(s) for s in processing)
        codec, level = compression_choice(compression)
        return Request(experiment, _runs(runs), cols, _events(events), filter, steps, table,
                       source, codec, level)

    def plan(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
             events: Events = None, **shape: Any) -> flight.FlightInfo:
        """GetFlightInfo: the result schema (after any processing), sizes and one endpoint per
        partition. `shape`: `filter=`, `processing=`, `table=`, `source=` and `compression=`,
        as for `request`."""
        descriptor = flight.FlightDescriptor.for_command(
            self.request(experiment, runs, columns, events, **shape).encode()
        )
        with _clean_errors():
            return self._plan_anywhere(descriptor)

    def _plan_anywhere(self, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        """GetFlightInfo at this client's server, else (it is down: UNAVAILABLE) at the other
        nodes of its cluster that earlier plans named, in turn: any node plans alike."""
        failed: list[str] = []
        for where in [self.location, *self._peers]:
            try:
                info = self.at(where).get_flight_info(descriptor)
            except flight.FlightUnavailableError as exc:
                failed.append(f"{where} ({str(_detailless(exc))[:200]})")
                continue
            if failed:
                log.info("planned at %s: %s", where, "; ".join(failed))
            self._learn(info)
            return info
        raise flight.FlightUnavailableError(
            "no node could plan the request: " + "; ".join(failed) + (
                "" if self._peers else " (no other node of a cluster is known to this client "
                "yet: connect to another)"))

    def _learn(self, info: flight.FlightInfo) -> None:
        """Remember the cluster's other nodes, as the plan's endpoints name them."""
        for endpoint in info.endpoints:
            for uri in locations(endpoint):
                if (uri != self.location and not uri.startswith(REUSE_CONNECTION)
                        and uri not in self._peers):
                    self._peers.append(uri)

    def schema(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
               table: str | None = None, source: str | None = None) -> pa.Schema:
        descriptor = flight.FlightDescriptor.for_command(
            self.request(experiment, runs, columns, table=table, source=source).encode()
        )
        with _clean_errors():
            return self._flight.get_schema(descriptor).schema

    # -- reading -----------------------------------------------------------------------------

    def read(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
             events: Events = None, *, parallel: int = 4, progress: bool = False,
             resume: bool = True, **shape: Any) -> pa.Table:
        """All requested events as one Table; endpoints fetched in parallel, order preserved.
        A transfer that breaks off (the connection dropped, the server restarted) resumes from
        the first event not yet received, for up to a minute of retries with backoff, and the
        result is as if nothing happened; `resume=False` raises instead. `shape`: `filter=`,
        `processing=`, `table=`, `source=` and `compression=`, as for `request`."""
        info = self.plan(experiment, runs, columns, events, **shape)
        bar = progress_bar(info.total_bytes, f"{experiment} {runs}") if progress else None
        try:
            tables = self._fetch_all(info, parallel, bar.update if bar else None, resume)
        finally:
            if bar is not None:
                bar.close()
        if not tables:
            return info.schema.empty_table()
        return pa.concat_tables(tables).replace_schema_metadata(info.schema.metadata)

    def _fetch_all(self, info: flight.FlightInfo, parallel: int,
                   on_bytes: Callable[[int], Any] | None, resume: bool = True
                   ) -> list[pa.Table]:
        def fetch(endpoint: flight.FlightEndpoint) -> pa.Table:
            with _clean_errors():
                reader = self.endpoint_reader(endpoint, resume)
                batches = []
                for batch in reader:
                    batches.append(batch)
                    if on_bytes is not None:
                        on_bytes(batch.nbytes)
                return pa.Table.from_batches(batches, schema=reader.schema)

        endpoints = list(info.endpoints)
        if len(endpoints) <= 1 or parallel <= 1:
            return [fetch(e) for e in endpoints]
        with ThreadPoolExecutor(max_workers=min(parallel, len(endpoints))) as pool:
            return list(pool.map(fetch, endpoints))

    def stream(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
               events: Events = None, *, resume: bool = True,
               **shape: Any) -> Iterator[pa.RecordBatch]:
        """RecordBatches in event order as they arrive; memory stays at about one batch.
        `resume` as for `read`."""
        return self.batches(self.plan(experiment, runs, columns, events, **shape), resume)

    def batches(self, info: flight.FlightInfo, resume: bool = True
                ) -> Iterator[pa.RecordBatch]:
        """The batches of every endpoint of a plan, in order, one endpoint after the other."""
        for endpoint in info.endpoints:
            with _clean_errors():
                yield from self.endpoint_reader(endpoint, resume)

    # -- SQL -------------------------------------------------------------------------------

    def sql(self, query: str, params: sql.Params = None) -> pa.Table:
        """Run a SELECT over `<experiment>.events` / `<experiment>.runs` on the server (DuckDB)
        and return the result. `params` fill the query's `?` placeholders: a list of values, a
        list of rows (the query runs once per row), or an Arrow table."""
        with self._statement(query, params) as info, _clean_errors():
            tables = [self._flight.do_get(e.ticket).read_all() for e in info.endpoints]
        return pa.concat_tables(tables) if tables else info.schema.empty_table()

    def sql_batches(self, query: str, params: sql.Params = None) -> Iterator[pa.RecordBatch]:
        """The result of `sql` as it streams in: memory stays at about one batch."""
        with self._statement(query, params) as info, _clean_errors():
            yield from sql.result_batches(self._flight, info)

    @contextlib.contextmanager
    def _statement(self, query: str, params: sql.Params) -> Iterator[flight.FlightInfo]:
        with _clean_errors():
            info, handle = sql.statement_info(self._flight, query, params)
        try:
            yield info
        finally:
            if handle is not None:
                with _clean_errors():
                    sql.close_statement(self._flight, handle)

    # -- live streams ----------------------------------------------------------------------

    def producer(self, experiment: str, stream: str, **options: Any) -> live.Producer:
        """A producer for live stream `stream` of `experiment` (needs the `write` grant):
        `send(batch)`, `flush()`, `close()`, `end_run()`. Options: `producer_id` (stable across
        restarts of the producing program, to make its resends idempotent), `retention_bytes`,
        `retention_seconds`, `max_unacked_bytes`."""
        return live.Producer(self._flight, experiment, stream, follow=self.at, **options)

    def subscribe(self, experiment: str, stream: str, from_: str | int | Any = "earliest",
                  group: str | None = None, columns: Sequence[str] | None = None,
                  filter: str | None = None, processing: Sequence[dict] | None = None,
                  **options: Any) -> live.Subscription:
        """Iterate over a live stream: stored batches from `from_` ("earliest", "latest", an
        offset or a time), then new ones as they arrive. With `group`, each batch goes to one
        member of the group; call `commit()` on the subscription when its work is done.
        `compression=` as for `request`."""
        return live.Subscription(self._flight, experiment, stream, from_=from_, group=group,
                                 columns=columns, filter=filter, processing=processing,
                                 follow=self.at, **options)

    def read_stream(self, experiment: str, stream: str,
                    columns: Sequence[str] | None = None) -> pa.Table:
        """Every event a live stream holds now, in order: what arrives meanwhile is left out
        (`subscribe` follows it instead)."""
        described = next((s for s in self.streams(experiment) if s["stream"] == stream), None)
        if described is None:
            raise pa.ArrowKeyError(f"experiment '{experiment}' has no live stream '{stream}' "
                                   "that you may read")
        with self.subscribe(experiment, stream, columns=columns) as sub:
            if described["events"] <= described["first_offset"]:
                descriptor = flight.FlightDescriptor.for_path(experiment, "live", stream)
                with _clean_errors():
                    return self._flight.get_schema(descriptor).schema.empty_table()
            batches = []
            for batch in sub:
                batches.append(batch)
                if sub.next >= described["events"]:
                    break
            return pa.Table.from_batches(batches, schema=sub.schema)

    def streams(self, experiment: str = "*") -> list[dict[str, Any]]:
        """Live streams you may read: events, rate, bytes on disk, consumer group lag. In a
        cluster each node describes the streams it owns: this asks every node alive."""
        body = {"experiment": experiment}
        with _clean_errors():
            found = live.action(self._flight, "streams", body)
            try:
                cluster = live.action(self._flight, "health", {}).get("cluster") or {}
            except flight.FlightUnauthorizedError:  # a job's token: its server's streams
                cluster = {}
            for node in cluster.get("nodes_alive", []):
                if node != self.location and node != cluster["location"]:
                    try:
                        found += live.action(self.at(node), "streams", body)
                    except flight.FlightUnavailableError as exc:  # gone since the last
                        log.info("streams: node %s did not answer: %s", node, exc)  # beat
        return sorted(found, key=lambda s: (s["experiment"], s["stream"]))

    def end_run(self, experiment: str, stream: str, run: int | None = None) -> dict[str, Any]:
        """End a live stream (no producer connected): it becomes a run of its experiment."""
        body: dict[str, Any] = {"experiment": experiment, "stream": stream}
        if run is not None:
            body["run"] = run
        with _clean_errors():
            return self._at_owner("end_run", body)

    def _at_owner(self, name: str, body: dict[str, Any]) -> Any:
        """A live stream's action, at the cluster node that owns the stream if this client's
        server says another does."""
        try:
            return live.action(self._flight, name, body)
        except flight.FlightUnavailableError as exc:
            owner = owner_named_in(exc)
            if owner is None:
                raise
            return live.action(self.at(owner), name, body)

    # -- data-request jobs -------------------------------------------------------------------

    def submit(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
               events: Events = None, *, filter: str | None = None,
               processing: Sequence[dict[str, Any]] | None = None,
               into: tuple[str, str], end_run: bool = True,
               key: str | None = None, table: str | None = None,
               source: str | None = None) -> jobs.Job:
        """Submit a data request as a job: the server produces the request's events (filtered
        and processed, as `read` would return them) into the live stream `into` =
        (experiment, stream) on its Dask workers; with `end_run` the stream becomes a run of
        that experiment when the job completes. `key` makes resubmitting safe: the same key
        returns the same job. `table` and `source` ("xtc2": the raw runs), as for `request`.
        Returns a `Job`: `.status()`, `.wait()`, `.stream()`, `.read()`, `.cancel()`."""
        body: dict[str, Any] = {
            "v": 1, "source": self.request(experiment, runs, columns, events, filter=filter,
                                           processing=processing, table=table,
                                           source=source).to_json(),
            "into": {"experiment": into[0], "stream": into[1]}, "end_run": end_run}
        if key is not None:
            body["key"] = key
        return jobs.Job(self, self._action("submit", body))

    def mirror(self, source: str, experiment: str, runs: Runs | None = None, *,
               stream: str | None = None, into: str, source_token: str | None = None,
               source_tls_root_certs: Any = None, source_ttl: int | None = 24 * 3600,
               end_run: bool = True, key: str | None = None) -> list[jobs.Job]:
        """Copy runs (or follow the live stream `stream`) of `experiment` at another site's
        server `source` into this server, as jobs that run here: one per run, each copied,
        verified against the source's digest and served as a run of `into` (keeping its number
        where that is free); a live stream is followed into `into`'s stream of the same name
        (`into="EXP/STREAM"` names another) and becomes a run when it ends at the source.

        The source's credentials: `source_token`, else your token for `source` (the
        environment, the keyring) narrowed there to reading `experiment` for `source_ttl`
        seconds. This server keeps them sealed while the jobs run and drops them after."""
        if (runs is None) == (stream is None):
            raise ValueError("give runs to copy or a live stream to follow, not both")
        into_experiment, _, into_stream = into.partition("/")
        token = jobs.source_credentials(source, experiment, source_token,
                                        source_tls_root_certs, source_ttl)
        origin: dict[str, Any] = {"location": source}
        if token:
            origin["token"] = token
        roots = credentials.tls_options(source_tls_root_certs, None, None).get("tls_root_certs")
        if roots:
            origin["tls_roots"] = roots.decode() if isinstance(roots, bytes) else roots
        bodies = []
        if stream is not None:
            sub = live.Request(experiment, stream).to_json()
            bodies.append(jobs.mirror_body(sub, origin, into_experiment, into_stream or stream,
                                           end_run, key))
        else:
            # each copy in a stream of its own, named after its key (the same key, the same
            # job) or else new
            suffix = key if key is not None else uuid.uuid4().hex[:8]
            for run in _runs(runs):
                request = self.request(experiment, run).to_json()
                bodies.append(jobs.mirror_body(
                    request, origin, into_experiment,
                    into_stream or f"mirror-{experiment}-r{run:04d}-{suffix}", end_run,
                    None if key is None else f"{key}-r{run}"))
        return [jobs.Job(self, self._action("submit", body)) for body in bodies]

    def job(self, job_id: str) -> jobs.Job:
        """A job submitted before (by you, or one you administer)."""
        return jobs.Job(self, self._action("job", {"job": job_id}))

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Your jobs, newest first (an admin sees every job of the experiments they
        administer), optionally only those in `state`."""
        body: dict[str, Any] = {"limit": limit}
        if state is not None:
            body["state"] = state
        return self._action("jobs", body)

    def _action(self, name: str, body: dict[str, Any]) -> Any:
        with _clean_errors():
            return live.action(self._flight, name, body)

    def polars(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
               events: Events = None, **kwargs: Any):
        """A Polars DataFrame; tensors become multi-dimensional Array columns."""
        return convert.to_polars(self.read(experiment, runs, columns, events, **kwargs))

    def pandas(self, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
               events: Events = None, **kwargs: Any):
        """A Pandas DataFrame; tensor cells are numpy arrays of the tensor's shape."""
        return convert.to_pandas(self.read(experiment, runs, columns, events, **kwargs))

    def numpy(self, experiment: str, runs: Runs, column: str, events: Events = None,
              **kwargs: Any) -> np.ndarray:
        """One column as an ndarray of shape (events, *per-event shape).

        The array wraps the received Arrow buffer when the result arrived as one batch; several
        batches are joined with one copy (see `clients.convert.column_to_numpy`).
        """
        table = self.read(experiment, runs, [column], events, **kwargs)
        return convert.column_to_numpy(table.column(0))


def connect(location: str = DEFAULT_LOCATION, token: str | None = None, **options: Any) -> Client:
    """Connect to a server, e.g. connect("grpc://127.0.0.1:8815").

    The bearer token is `token`, else $LCLSTREAM_TOKEN, else what `lclstream login LOCATION`
    stored in the keyring. TLS: `tls_root_certs` (CA bundle of a grpc+tls:// server), and for
    mutual TLS `cert_chain` and `private_key`; each PEM bytes or a file path. Other `options`
    go to pyarrow.flight.connect.
    """
    return Client(location, token, **options)


def _source(descriptor: flight.FlightDescriptor) -> str | None:
    """The source a listed run's path names ([experiment, run, source]), None for its default."""
    path = descriptor.path or []
    return path[2].decode() if len(path) == 3 else None


REUSE_CONNECTION = "arrow-flight-reuse-connection:"  # Flight's "the server you asked"


class EndpointReader:
    """The batches of one endpoint. Each batch of an archived run says where the stream would
    resume after it; when the stream breaks off, the reader asks again from there with a resume
    ticket (backing off, for up to `patience` seconds without progress), so every event arrives
    exactly once."""

    def __init__(self, flight_client: flight.FlightClient, ticket: flight.Ticket,
                 resume: bool = True, patience: float = 60.0,
                 start_from: int | None = None,
                 fallbacks: Sequence[tuple[str, flight.FlightClient]] = ()) -> None:
        self._flight, self._ticket, self._resume = flight_client, ticket, resume
        self._patience = patience
        # (location, connection) of the nodes that serve the endpoint, in order: a break moves
        # on to the next (a cluster's node gone), round and round until patience runs out
        self._nodes = list(fallbacks) or [("", flight_client)]
        self._failures: dict[str, str] = {}
        self.schema: pa.Schema | None = None
        self.resumed = 0  # how many times the stream was resumed
        # where to resume after the batches yielded so far (None: from the ticket's start)
        self.next_event = start_from

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        backoff = live.Backoff(self._patience)
        progressed = False  # since the last break: then the next attempt goes at once
        node = 0
        while True:
            ticket = self._ticket if self.next_event is None else flight.Ticket(
                resume_ticket(self._ticket.ticket, self.next_event))
            location, connection = self._nodes[node]
            try:
                reader = connection.do_get(ticket)
                self.schema = reader.schema
                announced = None  # where to resume once the next data batch is here
                for chunk in reader:
                    meta = (chunk.app_metadata.to_pybytes()
                            if chunk.app_metadata is not None else None)
                    at = read_progress(meta)
                    if not chunk.data.num_rows and (ahead := read_progress(meta, "next_after")
                                                    ) is not None:
                        announced = ahead  # a marker, not data: not yielded
                        continue
                    if at is None and announced is not None:
                        at, announced = announced, None
                    if at is not None:
                        self.next_event = at
                        backoff.succeeded()
                        progressed = True
                    yield chunk.data
                return
            except Exception as exc:
                if not self._resume or not live.transient(exc):
                    raise
                self._failures[location] = str(exc).split(". Detail:")[0][:200]
                node = (node + 1) % len(self._nodes)
                # a stream that was delivering broke: ask again at once (the next node, in a
                # cluster); back off only when every node failed in a row (restarting)
                if not progressed and node == 0 and not backoff.wait():
                    if len(self._nodes) > 1:
                        raise flight.FlightUnavailableError(
                            "every location of the endpoint failed: " + "; ".join(
                                f"{where}: {why}" for where, why in self._failures.items())
                        ) from exc
                    raise
                progressed = False
                self.resumed += 1
