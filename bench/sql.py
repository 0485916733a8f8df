"""Flight SQL: what a query costs through a driver, against DuckDB on the same sources in-process.

Three measurements against one server process (authentication on, as in production):

1. An aggregation over millions of events (`GROUP BY run` over an experiment of scalar-only
   runs) through ADBC on loopback, against DuckDB in this process running the same query on the
   same `events` view over the same Arrow sources (`flight_server.sql`), built once beforehand.
   The ratio is what Flight SQL adds on top of the engine.
2. A large result (>= 1 GiB of waveforms) fetched with ADBC `fetch_arrow_table`, against DoGet
   of the same column of the same run from the same server, in GB/s of Arrow bytes; and, for
   information, the same with the 1 MiB frames and the waveforms of the throughput bench's run.
   Each contender fetches in a client process of its own (`bench.common.ClientProcess`).
3. The round trip of a small query, connection made once, through ADBC and `Client.sql`.

Where the time goes is shown beside each: `Client.sql` (plain pyarrow Flight SQL, no driver),
the plan (GetFlightInfo) and the run (DoGet) timed apart, and the in-process engine with a
session opened per query, as the server opens one per RPC. Contenders take turns within each
repetition, after unmeasured rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight

from bench.common import (
    DATA,
    HUGE_PARTITION,
    STATE,
    BenchRun,
    ClientProcess,
    GiB,
    Result,
    ServerProcess,
    bench_run,
    cpu_seconds,
    fmt_bytes,
    gbps,
    kept,
    measure_each,
    ms,
    our_server,
    percentile,
    print_table,
    ready_all,
    scalar_experiment,
    section,
    timed,
    verdict_line,
    warm_cache,
    waveform_run,
)
from clients import Client, connect
from clients.credentials import BearerToken
from clients.sql import statement_info
from flight_server import config
from flight_server.catalog import Catalog
from flight_server.sources.streaming import BatchSizing
from flight_server.sql.databases import DatabasePool, Limits
from flight_server.sql.engine import Session, open_session
from flight_server.sql.tables import ReadContext
from schemas import Request

NAME = "sql"
TARGET_AGG_RATIO = 1.5  # ADBC / in-process DuckDB, aggregation
TARGET_LARGE_RATIO = 0.8  # SQL / DoGet GB/s, large result
TARGET_SMALL_P50 = 0.020  # seconds, small query round trip through ADBC
RUNS = 4  # runs of each scalar experiment
SMALL_EVENTS = 10_000  # events per run of the small query's experiment
WAVEFORMS = "tof/waveforms"
SMALL_WARMUP = 3
LARGE_WARMUP = 2  # unmeasured rounds of each large result: a client process's first fetches
#                   page-fault fresh memory in from its allocators
CHILD_TIMEOUT = 600.0  # seconds a client process may take to start or to answer one fetch


# -- ways to run a query -----------------------------------------------------------------------


def adbc_connect(location: str, token: str | None):
    """An ADBC Flight SQL connection to `location`, with the bench's token."""
    import adbc_driver_flightsql.dbapi as dbapi
    from adbc_driver_flightsql import DatabaseOptions

    kwargs = {}
    if token:
        kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {token}"
    return dbapi.connect(location, db_kwargs=kwargs, autocommit=True)


def adbc_query(conn, query: str) -> pa.Table:
    """A new cursor per query, as most code does. The DB-API layer prepares a query the cursor
    has not run before: CreatePreparedStatement, GetFlightInfo, DoGet, ClosePreparedStatement."""
    with conn.cursor() as cur:
        cur.execute(query)
        return cur.fetch_arrow_table()


def adbc_again(cur, query: str) -> pa.Table:
    """The same cursor running the same query again: prepared once, so GetFlightInfo + DoGet."""
    cur.execute(query)
    return cur.fetch_arrow_table()


def flight_sql_plan(raw: flight.FlightClient, query: str) -> flight.FlightInfo:
    """GetFlightInfo of a CommandStatementQuery: what the server does before any result."""
    return statement_info(raw, query)[0]


def read_endpoints(raw: flight.FlightClient, info: flight.FlightInfo) -> pa.Table:
    tables = [raw.do_get(e.ticket).read_all() for e in info.endpoints]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


class InProcess:
    """DuckDB in this process over the same sources as the server's: the settings it loads
    (batch sizing, read threads, DuckDB limits), a catalog of the bench data root, and the same
    `events` view, built once by `flight_server.sql.engine` for `experiment`."""

    def __init__(self, experiment: str) -> None:
        settings = config.load(overrides={"data": DATA, "state_dir": STATE})
        self.catalog = Catalog(DATA)
        self.pool = ThreadPoolExecutor(settings.read_threads, thread_name_prefix="read")
        self.context = ReadContext(BatchSizing(settings.batch_bytes, settings.first_batch_bytes,
                                               settings.prefetch), self.pool)
        self.databases = DatabasePool(Limits(settings.sql_timeout, settings.sql_memory_limit,
                                             settings.sql_threads))
        self.session = open_session(self.catalog, self.databases,
                                    f"SELECT * FROM {experiment}.events", lambda e: True,
                                    self.context)

    def query(self, query: str, session: Session | None = None) -> pa.Table:
        """The query on the session built once (the engine alone), or on `session`."""
        schema, batches = (session or self.session).batches(query, None, lambda: False)
        return pa.Table.from_batches(list(batches), schema)

    def query_fresh(self, query: str) -> pa.Table:
        """As the server does per RPC: rescan the catalog, parse the query, take a pooled
        database (with what the query names attached, unless it still is), run the query and
        give the database back."""
        with open_session(self.catalog, self.databases, query, lambda e: True,
                          self.context) as session:
            return self.query(query, session)

    def close(self) -> None:
        self.session.close()
        self.databases.close()
        self.pool.shutdown(wait=True)
        self.catalog.close()


@dataclass
class Timing:
    """One contender: wall-clock seconds, and CPU seconds of this process (the client, or the
    engine in-process) and of the server, per call."""

    label: str
    call: Callable[[], object]
    server: psutil.Process | None = None
    seconds: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    last: object = None

    def measure(self, me: psutil.Process, keep: bool) -> None:
        self.last = None  # a large result is freed before the next one arrives
        c0, s0 = cpu_seconds(me), cpu_seconds(self.server)
        seconds, self.last = timed(self.call)
        if keep:
            self.seconds.append(seconds)
            self.client_cpu.append(cpu_seconds(me) - c0)
            self.server_cpu.append(cpu_seconds(self.server) - s0)

    def p(self, q: float) -> float:
        return percentile(self.seconds, q)

    def cpu(self) -> tuple[float, float]:
        """Mean CPU seconds per call, client and server: the OS counts in 10 ms ticks, too
        coarse for one small query, so the mean over many."""
        n = len(self.seconds)
        return sum(self.client_cpu) / n, sum(self.server_cpu) / n


def take_turns(timings: list[Timing], rounds: int, warmup: int = 1) -> None:
    """`warmup` unmeasured rounds, then `rounds` measured ones, the contenders taking turns."""
    me = psutil.Process()
    for i in range(warmup + rounds):
        for t in timings:
            t.measure(me, keep=i >= warmup)


def cpu_cells(t: Timing) -> list[str]:
    client, server = t.cpu()
    return [ms(client), ms(server) if t.server else "-"]


# -- 1. aggregation ----------------------------------------------------------------------------


def aggregation_query(experiment: str) -> str:
    return (f'SELECT run, count(*) AS events, avg("gmd/energy") AS mean_energy, '
            f'max("gmd/energy") AS max_energy FROM {experiment}.events GROUP BY run ORDER BY run')


def same_aggregate(a: pa.Table, b: pa.Table) -> bool:
    """Equal counts and maxima; means equal to rounding (threads may sum in another order)."""
    if a.num_rows != b.num_rows or a.column_names != b.column_names:
        return False
    return (a["run"].equals(b["run"]) and a["events"].equals(b["events"])
            and a["max_energy"].equals(b["max_energy"])
            and np.allclose(a["mean_energy"].to_numpy(), b["mean_energy"].to_numpy(),
                            rtol=1e-12))


def aggregation(args: argparse.Namespace, server: ServerProcess, conn, client: Client,
                raw: flight.FlightClient) -> list[Result]:
    per_run = max(1, args.events // RUNS)
    total = per_run * RUNS
    section(f"sql: aggregation over {total:,} events ({RUNS} runs), median of {args.reps}")
    experiment = scalar_experiment(RUNS, per_run)
    for path in sorted((DATA / experiment).glob("*.h5")):
        warm_cache(path)
    query = aggregation_query(experiment)
    proc = psutil.Process(server.pid)

    local = InProcess(experiment)
    try:
        ticket = flight_sql_plan(raw, query).endpoints[0].ticket
        timings = [
            Timing("ADBC, loopback", lambda: adbc_query(conn, query), proc),
            Timing("in-process DuckDB, view built once", lambda: local.query(query)),
            Timing("Client.sql (pyarrow, no driver)", lambda: client.sql(query), proc),
            Timing("  Flight SQL GetFlightInfo alone (plan)",
                   lambda: flight_sql_plan(raw, query), proc),
            Timing("  Flight SQL DoGet alone (run)", lambda: raw.do_get(ticket).read_all(), proc),
            Timing("in-process, session opened per query", lambda: local.query_fresh(query)),
        ]
        take_turns(timings, args.reps)
    finally:
        local.close()

    adbc, engine = timings[0], timings[1]
    same = all(same_aggregate(t.last, engine.last) for t in timings
               if isinstance(t.last, pa.Table))
    print(f"  {query}")
    print(f"  {args.reps} repetitions, taking turns, one unmeasured round first; events/s: "
          f"{total:,} events / median; CPU: mean per query of this process and of the server")
    rows = [[t.label, ms(t.p(50)), ms(min(t.seconds)),
             f"{total / t.p(50) / 1e6:.0f} M" if isinstance(t.last, pa.Table) else "-",
             f"{t.p(50) / engine.p(50):.2f}", *cpu_cells(t)] for t in timings]
    print_table(["contender", "median", "best", "events/s", "/ in-process", "client CPU",
                 "server CPU"], rows, right=(1, 2, 3, 4, 5, 6))
    print(f"  same result everywhere: {same}")
    ratio = adbc.p(50) / engine.p(50)
    ok = ratio <= TARGET_AGG_RATIO and same
    verdict_line("ADBC / in-process DuckDB, aggregation", f"{ratio:.2f}",
                 f"<= {TARGET_AGG_RATIO}", ok)
    return [
        Result(NAME, f"aggregation {total / 1e6:g} M events, ADBC/in-process (median)",
               f"{ms(adbc.p(50))}/{ms(engine.p(50))} = {ratio:.2f}", f"<= {TARGET_AGG_RATIO}",
               ok),
        Result(NAME, "aggregation events/s, ADBC (in-process)",
               f"{total / adbc.p(50) / 1e6:.0f} M ({total / engine.p(50) / 1e6:.0f} M)"),
    ]


# -- 2. large result ---------------------------------------------------------------------------


def same_values(sql: pa.Table, doget: pa.Table) -> bool:
    """The SQL result (nested lists) holds the very values DoGet sends (tensor columns)."""
    for name in doget.column_names:
        a = sql.column(name).combine_chunks()
        b = doget.column(name).combine_chunks()
        b = b.storage if isinstance(b, pa.ExtensionArray) else b
        while pa.types.is_list(a.type) or pa.types.is_fixed_size_list(a.type):
            a = pc.list_flatten(a)
        while pa.types.is_list(b.type) or pa.types.is_fixed_size_list(b.type):
            b = pc.list_flatten(b)
        if a.null_count or not np.array_equal(a.to_numpy(), b.to_numpy()):
            return False
    return True


# Each large-result contender runs in a client process of its own, whose freed memory glibc keeps
# for reuse (`keep_freed_memory`). Fetching a gigabyte into fresh memory page-faults it in, about
# 1 CPU-s a GiB on the client; with three contenders sharing one process, and three allocators
# (pyarrow's mimalloc, glibc's under gRPC's buffers, ADBC's Go runtime), who pays those faults
# varies from round to round, and glibc returns a freed gigabyte to the OS after every fetch.


def fetcher(kind: str, location: str, token: str | None
            ) -> tuple[Callable[[dict], pa.Table], Callable[[], None]]:
    """In a client process: a connection for contender `kind`, as (fetch one result, close)."""
    if kind == "adbc":
        conn = adbc_connect(location, token)
        return (lambda work: adbc_query(conn, work["query"])), conn.close
    if kind == "client.sql":
        client = connect(location, token)
        return (lambda work: client.sql(work["query"])), client.close
    if kind == "doget":
        raw = flight.connect(location, middleware=[BearerToken(token)] if token else [])

        def doget(work: dict) -> pa.Table:
            descriptor = flight.FlightDescriptor.for_command(work["command"])
            return read_endpoints(raw, raw.get_flight_info(descriptor))

        return doget, raw.close
    raise ValueError(f"no contender {kind!r}")


class Contender:
    """In a client process: a large-result contender's connection (made by the process's setup,
    then kept), and the processes whose CPU time its fetches take, this one and the server."""

    def __init__(self, kind: str, location: str, token: str | None, server_pid: int) -> None:
        self.get, self.close = fetcher(kind, location, token)
        self.me, self.server = psutil.Process(), psutil.Process(server_pid)


def open_contender(kind: str, location: str, token: str | None, server_pid: int) -> None:
    """The setup of a contender's client process: connect."""
    kept("contender", lambda: Contender(kind, location, token, server_pid))


def fetch(work: dict) -> tuple[float, float, float, int, int]:
    """In a client process: fetch what `work` asks; wall-clock seconds, CPU seconds of this
    process and of the server, and the result's bytes and rows. The result is freed before the
    answer is sent."""
    contender: Contender = kept("contender")
    me, server = contender.me, contender.server
    c0, s0 = cpu_seconds(me), cpu_seconds(server)
    t0 = time.perf_counter()
    table = contender.get(work)
    seconds = time.perf_counter() - t0
    answer = (seconds, cpu_seconds(me) - c0, cpu_seconds(server) - s0, table.nbytes,
              table.num_rows)
    del table
    return answer


def contender_processes(server: ServerProcess) -> list[ClientProcess]:
    """A client process for each contender, in the order of LARGE_CONTENDERS, started once
    (spawned: it inherits none of this process's heap) and kept for every large result; its
    allocators warm up on its own fetches only. All start at once, then are awaited."""
    return ready_all([ClientProcess(f"sql-{kind}", open_contender, kind, server.location,
                                    server.token, server.pid, timeout=CHILD_TIMEOUT)
                      for kind, _ in LARGE_CONTENDERS])


class InClient(Timing):
    """A contender timed in its client process: `call` fetches there and returns what `fetch`
    does; `last` keeps its (bytes, rows)."""

    def measure(self, me: psutil.Process, keep: bool) -> None:
        seconds, client_cpu, server_cpu, nbytes, rows = self.call()
        self.last = (nbytes, rows)
        if keep:
            self.seconds.append(seconds)
            self.client_cpu.append(client_cpu)
            self.server_cpu.append(server_cpu)


LARGE_CONTENDERS = (  # ADBC, DoGet, Client.sql: the order of LargeCase.timings
    ("adbc", "ADBC execute + fetch_arrow_table"),
    ("doget", "DoGet (GetFlightInfo of a JSON request)"),
    ("client.sql", "Client.sql (pyarrow, no driver)"),
)


@dataclass
class LargeCase:
    """One large result, fetched by every contender; `timings` are ADBC, DoGet, Client.sql."""

    label: str
    run: BenchRun
    columns: tuple[str, ...]
    timings: list[Timing] = field(default_factory=list)
    same: bool = False
    nbytes: int = 0
    sql_nbytes: int = 0
    events: int = 0

    @property
    def query(self) -> str:
        names = ", ".join(f'"{c}"' for c in self.columns)
        return f"SELECT {names} FROM {self.run.experiment}.events WHERE run = {self.run.number}"

    def measure(self, reps: int, conn, raw: flight.FlightClient,
                clients: list[ClientProcess]) -> None:
        command = Request(self.run.experiment, (self.run.number,), self.columns).encode()
        warm_cache(self.run.path)
        descriptor = flight.FlightDescriptor.for_command(command)
        self.same = same_values(adbc_query(conn, self.query),  # once, unmeasured, in this process
                                read_endpoints(raw, raw.get_flight_info(descriptor)))
        work = {"query": self.query, "command": command}
        self.timings = [InClient(label, (lambda c=c: c.call(fetch, work)))
                        for c, (_, label) in zip(clients, LARGE_CONTENDERS, strict=True)]
        take_turns(self.timings, reps, LARGE_WARMUP)
        adbc, get, _ = self.timings
        self.sql_nbytes = adbc.last[0]
        self.nbytes, self.events = get.last

    def ratio(self) -> float:
        return self.timings[1].p(50) / self.timings[0].p(50)

    def gbps(self, t: Timing) -> float:
        return gbps(self.nbytes, t.p(50))


def large_result(args: argparse.Namespace, server: ServerProcess, conn, client: Client,
                 raw: flight.FlightClient) -> list[Result]:
    section(f"sql: large result, {fmt_bytes(args.size)}, median of {args.reps}")
    waves = waveform_run(args.size)
    frames = bench_run(args.size)
    cases = [
        LargeCase("waveforms", waves, (WAVEFORMS,)),
        LargeCase("frames", frames, ("epix/image", WAVEFORMS)),
    ]
    clients: list[ClientProcess] = []
    try:
        clients = contender_processes(server)
        for case in cases:
            case.measure(args.reps, conn, raw, clients)
    finally:
        for c in clients:
            c.close()

    for case in cases:
        print(f"  {case.label}: {case.query}")
        print(f"    {case.run.path.relative_to(DATA.parent)}: {case.events} events, "
              f"{fmt_bytes(case.nbytes)} (SQL result: {fmt_bytes(case.sql_nbytes)})")
    print("  waveforms: 8192 float32 a row, beside 16x16 frames, since the throughput bench's run "
          "holds too few (32 MiB a GiB); frames: that run's 1 MiB epix/image frames and its "
          "waveforms, all of its data")
    print(f"  each contender in a client process of its own (started once; freed memory kept "
          f"for reuse); {LARGE_WARMUP} unmeasured rounds of each result, then {args.reps} "
          f"taking turns")
    print("  GB/s of the DoGet result's Arrow bytes for every contender (SQL's result holds the "
          "same values as lists, with offsets and validity); DoGet is planned as one endpoint, "
          "one stream as SQL's; CPU: median seconds per GiB, client: the contender's process")
    rows = []
    for case in cases:
        get = case.timings[1]
        per_gib = GiB / case.nbytes
        for t in case.timings:
            rows.append([case.label, t.label, f"{case.gbps(t):.2f}",
                         f"{gbps(case.nbytes, min(t.seconds)):.2f}", ms(t.p(50)),
                         f"{case.gbps(t) / case.gbps(get):.2f}",
                         f"{np.median(t.client_cpu) * per_gib:.2f}",
                         f"{np.median(t.server_cpu) * per_gib:.2f}"])
    print_table(["result", "contender", "median GB/s", "best GB/s", "median time", "/ DoGet",
                 "client CPU", "server CPU"], rows, right=(2, 3, 4, 5, 6, 7))
    print("  same values as DoGet: "
          + ", ".join(f"{case.label} {case.same}" for case in cases))
    results = []
    for case, target in zip(cases, (True, False), strict=True):
        ok = case.ratio() >= TARGET_LARGE_RATIO and case.same
        adbc, get = case.timings[0], case.timings[1]
        if target:
            verdict_line(f"ADBC / DoGet GB/s, {case.label} (median)", f"{case.ratio():.2f}",
                         f">= {TARGET_LARGE_RATIO}", ok)
        value = f"{case.gbps(adbc):.2f}/{case.gbps(get):.2f} = {case.ratio():.2f}"
        results.append(Result(NAME, f"large result, {case.label} {fmt_bytes(case.nbytes)}, "
                                    f"ADBC/DoGet GB/s", value,
                              f">= {TARGET_LARGE_RATIO}" if target else "",
                              ok if target else (None if case.same else False)))
    return results


# -- 3. small query ----------------------------------------------------------------------------


def small_query(args: argparse.Namespace, server: ServerProcess, conn, client: Client,
                raw: flight.FlightClient) -> list[Result]:
    section(f"sql: small query round trip, {args.requests} executions, connection made once")
    experiment = scalar_experiment(RUNS, SMALL_EVENTS)
    query = f"SELECT count(*) AS events FROM {experiment}.events WHERE run = 1"
    proc = psutil.Process(server.pid)
    local = InProcess(experiment)
    cursor = conn.cursor()
    try:
        ticket = flight_sql_plan(raw, query).endpoints[0].ticket
        timings = [
            Timing("ADBC, new cursor (prepares: 4 RPCs)", lambda: adbc_query(conn, query), proc),
            Timing("Client.sql (GetFlightInfo + DoGet)", lambda: client.sql(query), proc),
            Timing("ADBC, same cursor again (prepared once)", lambda: adbc_again(cursor, query),
                   proc),
            Timing("  Flight SQL GetFlightInfo alone (plan)",
                   lambda: flight_sql_plan(raw, query), proc),
            Timing("  Flight SQL DoGet alone (run)", lambda: raw.do_get(ticket).read_all(), proc),
            Timing("in-process, session opened per query", lambda: local.query_fresh(query)),
            Timing("in-process, view built once", lambda: local.query(query)),
        ]
        take_turns(timings, args.requests, SMALL_WARMUP)
    finally:
        cursor.close()
        local.close()

    counts = {t.last.column(0)[0].as_py() for t in timings if isinstance(t.last, pa.Table)}
    print(f"  {query}   ({RUNS} runs x {SMALL_EVENTS:,} events)")
    print(f"  {SMALL_WARMUP} unmeasured rounds first, then taking turns query by query; count(*) "
          f"{' / '.join(str(c) for c in sorted(counts))}; CPU: mean per query")
    rows = [[t.label, ms(t.p(50)), ms(t.p(90)), ms(min(t.seconds)), *cpu_cells(t)]
            for t in timings]
    print_table(["contender", "p50", "p90", "min", "client CPU", "server CPU"], rows,
                right=(1, 2, 3, 4, 5))
    adbc, client_sql, again = timings[0], timings[1], timings[2]
    ok = adbc.p(50) < TARGET_SMALL_P50 and counts == {SMALL_EVENTS}
    verdict_line("ADBC small query round trip, p50", ms(adbc.p(50)),
                 f"< {ms(TARGET_SMALL_P50)}", ok)
    return [
        Result(NAME, "small query p50 (p90), ADBC new cursor",
               f"{ms(adbc.p(50))} ({ms(adbc.p(90))})", f"< {ms(TARGET_SMALL_P50)}", ok),
        Result(NAME, "small query p50 (p90), ADBC same cursor again",
               f"{ms(again.p(50))} ({ms(again.p(90))})"),
        Result(NAME, "small query p50 (p90), Client.sql",
               f"{ms(client_sql.p(50))} ({ms(client_sql.p(90))})"),
    ]


def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    # DoGet plans one endpoint, so that it is one stream as a SQL result is; the partition size
    # plays no part in SQL.
    with our_server("lclstream-sql", partition_bytes=HUGE_PARTITION) as server:
        raw = server.flight_client()
        client = server.client()
        conn = adbc_connect(server.location, server.token)
        try:
            results += measure_each(NAME, (aggregation, large_result, small_query),
                                    args, server, conn, client, raw)
        finally:
            conn.close()
            client.close()
            raw.close()
    return results
