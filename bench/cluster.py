"""Cluster mode: what planning over several nodes costs, and three nodes read at once.

`--only cluster`. A real PostgreSQL (`tests/cluster/postgres.py`: Debian's `postgresql`, a fresh
cluster in a temporary directory on a free loopback port) holds the shared state; three nodes
run `lclstream serve` over the bench data root with `--cluster --state-url ...`, otherwise the
same command line as a single server beside them (authentication on, the bench's token, the
bench's state directory, so every node has the same keys). Every server of this benchmark is
started with `--partition-bytes` = `--size` / 16, so that the bench run has 16 endpoints: with
the default 256 MiB a 128 MiB run (`--quick`) is one endpoint, which one node would serve whole.

1. **Planning overhead**: GetFlightInfo (`Client.plan`) of the `--size` bench run (16
   endpoints) and of a multi-run request (the 4 runs of `bench_scalars_4x10000`, the SQL
   benchmark's small-query experiment, written once) at the single server and at a cluster
   node once all three nodes are registered (every endpoint then gets a first location and a
   fallback by rendezvous hash over the three), taking turns request by request, each request
   followed by a short idle, after unmeasured rounds; p50 and p90. Target: cluster / single
   p50 <= 1.2 for each request.
2. **Three nodes read by three clients**: three client processes, each reading the whole bench
   run with `Client.read(..., parallel=4)` at the same time, against the single server (all
   three connected to it) and against the cluster (client i connected to node i, which plans;
   each endpoint is read at its first location); taking turns round by round in alternating
   order after an unmeasured round. Aggregate GB/s = the three reads' Arrow bytes / (last end -
   first start), median over the rounds; CPU seconds of each server process (psutil) per GiB
   delivered, and per GiB it served itself (the bytes of the endpoints whose first location it
   is, measured once by reading each endpoint apart). Informational: on a 2-core machine the
   aggregate cannot grow much, since the nodes share the cores; the per-node cost shows what a
   cluster of real machines gains. The spread of the endpoints over the nodes is printed.

PostgreSQL is removed and every server stopped at the end, on an error or Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import pyarrow.flight as flight

from bench.common import (
    BenchRun,
    ClientProcess,
    GiB,
    MiB,
    Result,
    ServerProcess,
    bench_run,
    bench_token,
    cpu_seconds,
    fmt_bytes,
    gather,
    gbps,
    kept,
    measure_each,
    median,
    ms,
    our_server,
    percentile,
    print_table,
    ready_all,
    scalar_experiment,
    section,
    verdict_line,
    warm_cache,
)
from clients import Client

NAME = "cluster"
TARGET_PLAN_RATIO = 1.2  # cluster / single GetFlightInfo p50
NODES = 3
CLIENTS = 3
PARALLEL = 4  # Client.read's endpoints in flight (its default)
ENDPOINTS = 16  # --partition-bytes = --size / this, for every server of the benchmark
MULTI_RUNS, MULTI_EVENTS = 4, 10_000  # the multi-run request: bench_scalars_4x10000 runs 1-4
PLAN_REQUESTS = 4  # GetFlightInfo requests per case: this many times --requests (each is ms)
WARMUP = 5
GAP = 0.02  # idle after each request, so the next meets a server that has wound down
JOIN_TIMEOUT = 30.0  # seconds for every node to see the others (heartbeat 1 s)


# -- servers -----------------------------------------------------------------------------------


def partition_bytes(size: int) -> int:
    return max(MiB, size // ENDPOINTS)


def cluster_node(name: str, state_url: str, partition: int) -> ServerProcess:
    """`our_server`'s command line (auth on, the bench's state directory: the same keys on
    every node) with `--cluster --state-url`."""
    server = our_server(name, partition_bytes=partition)
    server.args += ["--cluster", "--state-url", state_url]
    return server


def first_locations(info: flight.FlightInfo) -> list[str]:
    return [uri(e.locations[0]) if e.locations else "" for e in info.endpoints]


def uri(location: flight.Location) -> str:
    return location.uri.decode() if isinstance(location.uri, bytes) else str(location.uri)


def wait_for_nodes(nodes: list[ServerProcess], br: BenchRun) -> None:
    """Until every node's plan of the bench run names all the nodes (each has heard of the
    others at a heartbeat)."""
    want = {n.location for n in nodes}
    deadline = time.monotonic() + JOIN_TIMEOUT
    for node in nodes:
        with node.client() as client:
            while True:
                info = client.plan(br.experiment, br.number)
                named = {uri(loc) for e in info.endpoints for loc in e.locations}
                if named == want:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {node.location} plans with {sorted(named)} after "
                                       f"{JOIN_TIMEOUT:.0f} s, not all of {sorted(want)}")
                time.sleep(0.2)


# -- planning ------------------------------------------------------------------------------------


@dataclass
class PlanCase:
    label: str
    plan: Callable[[], flight.FlightInfo]
    server: psutil.Process
    seconds: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    endpoints: int = 0
    locations: int = 0  # per endpoint

    def request(self) -> tuple[float, float]:
        cpu0 = cpu_seconds(self.server)
        t0 = time.perf_counter()
        info = self.plan()
        seconds = time.perf_counter() - t0
        time.sleep(GAP)
        self.endpoints = len(info.endpoints)
        self.locations = max((len(e.locations) for e in info.endpoints), default=0)
        return seconds, cpu_seconds(self.server) - cpu0

    def p(self, q: float) -> float:
        return percentile(self.seconds, q)


def measure_planning(args: argparse.Namespace, br: BenchRun, multi: str,
                     single: ServerProcess, node: ServerProcess) -> list[Result]:
    requests = PLAN_REQUESTS * args.requests
    runs = list(range(1, MULTI_RUNS + 1))
    with single.client() as one, node.client() as member:
        what = {f"run {br.number} MiB": lambda c: c.plan(br.experiment, br.number),
                f"{MULTI_RUNS} runs": lambda c: c.plan(multi, runs)}
        pairs = [(PlanCase(f"single: {w}", lambda c=one, f=f: f(c), psutil.Process(single.pid)),
                  PlanCase(f"cluster: {w}", lambda c=member, f=f: f(c),
                           psutil.Process(node.pid)))
                 for w, f in what.items()]
        cases = [c for pair in pairs for c in pair]
        for i in range(WARMUP + requests):
            for case in cases:
                seconds, cpu = case.request()
                if i >= WARMUP:
                    case.seconds.append(seconds)
                    case.server_cpu.append(cpu)

    print(f"  GetFlightInfo (Client.plan) at the single server and at cluster node 1 of "
          f"{NODES}: {br.experiment} run {br.number} and {multi} runs 1-{MULTI_RUNS}; "
          f"{requests} requests per case, taking turns, each followed by "
          f"{GAP * 1e3:.0f} ms idle; {WARMUP} rounds unmeasured first")
    print_table(["case", "endpoints", "locations", "p50", "p90", "min", "server CPU/req"],
                [[c.label, c.endpoints, c.locations, ms(c.p(50)), ms(c.p(90)),
                  ms(min(c.seconds)), ms(sum(c.server_cpu) / len(c.server_cpu))]
                 for c in cases], right=(1, 2, 3, 4, 5, 6))
    results = []
    for (what_, _), (a, b) in zip(what.items(), pairs, strict=True):
        ratio = b.p(50) / a.p(50)
        ok = ratio <= TARGET_PLAN_RATIO and b.locations == 2
        verdict_line(f"cluster/single plan p50, {what_}", f"{ratio:.2f}",
                     f"<= {TARGET_PLAN_RATIO}", ok)
        results.append(Result(NAME, f"GetFlightInfo p50 cluster/single, {what_}",
                              f"{ms(b.p(50))}/{ms(a.p(50))} = {ratio:.2f}",
                              f"<= {TARGET_PLAN_RATIO}", ok))
        results.append(Result(NAME, f"GetFlightInfo p90 cluster/single, {what_}",
                              f"{ms(b.p(90))}/{ms(a.p(90))} = {b.p(90) / a.p(90):.2f}"))
    return results


# -- the clients, in processes of their own --------------------------------------------------


def client_setup(single: str, node: str, token: str) -> None:
    from clients import connect

    kept("single", lambda: connect(single, token))
    kept("cluster", lambda: connect(node, token))


def client_read(which: str, experiment: str, run: int) -> dict[str, Any]:
    """`Client.read` of the whole run from `which` ("single" or "cluster"): its Arrow bytes,
    rows and when it began and ended (time.monotonic: one clock for every process)."""
    start = time.monotonic()
    table = kept(which).read(experiment, run, parallel=PARALLEL)
    end = time.monotonic()
    return {"nbytes": table.nbytes, "rows": table.num_rows, "start": start, "end": end}


def client_check(which: str, experiment: str, run: int) -> tuple[int, tuple]:
    """(rows, fingerprint) of `Client.read` of the run from `which`."""
    from bench.wire import fingerprint

    table = kept(which).read(experiment, run, parallel=PARALLEL)
    return table.num_rows, fingerprint(table)


def client_spread(experiment: str, run: int) -> dict[str, list[int]]:
    """{first location: [endpoints, Arrow bytes]} of the cluster's plan, each endpoint read
    apart from where the plan says."""
    client: Client = kept("cluster")
    spread: dict[str, list[int]] = {}
    for endpoint in client.plan(experiment, run).endpoints:
        where = uri(endpoint.locations[0]) if endpoint.locations else client.location
        nbytes = sum(b.nbytes for b in client.endpoint_reader(endpoint))
        entry = spread.setdefault(where, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    return spread


@dataclass
class Side:
    """The single server or the cluster, read by the three clients at once, round by round."""

    label: str
    which: str
    servers: list[psutil.Process]
    seconds: list[float] = field(default_factory=list)
    server_cpu: list[list[float]] = field(default_factory=list)  # per round, per server
    client_cpu: list[float] = field(default_factory=list)
    nbytes: int = 0

    def round(self, clients: list[ClientProcess], procs: list[psutil.Process],
              br: BenchRun) -> None:
        s0 = [cpu_seconds(p) for p in self.servers]
        c0 = sum(cpu_seconds(p) for p in procs)
        for c in clients:
            c.start(client_read, self.which, br.experiment, br.number)
        answers = gather(clients)
        self.client_cpu.append(sum(cpu_seconds(p) for p in procs) - c0)
        self.server_cpu.append([cpu_seconds(p) - s for p, s in zip(self.servers, s0,
                                                                    strict=True)])
        self.seconds.append(max(a["end"] for a in answers) - min(a["start"] for a in answers))
        self.nbytes = sum(a["nbytes"] for a in answers)

    def reset(self) -> None:
        self.seconds.clear()
        self.server_cpu.clear()
        self.client_cpu.clear()

    def gbps(self) -> float:
        return gbps(self.nbytes, median(self.seconds))

    def cpu_per_gib(self, i: int | None = None) -> float:
        """Median CPU seconds of server i (None: all together) per GiB the clients received."""
        per_round = [sum(r) if i is None else r[i] for r in self.server_cpu]
        return median(per_round) * GiB / self.nbytes


def measure_reads(args: argparse.Namespace, br: BenchRun, single: ServerProcess,
                  nodes: list[ServerProcess]) -> list[Result]:
    token = bench_token()
    clients = ready_all([ClientProcess(f"cluster-client-{i}", client_setup, single.location,
                                       nodes[i % NODES].location, token, timeout=600)
                         for i in range(CLIENTS)])
    try:
        procs = [psutil.Process(c.process.pid) for c in clients]
        node_procs = [psutil.Process(n.pid) for n in nodes]
        sides = [Side("single server, 3 clients", "single", [psutil.Process(single.pid)]),
                 Side(f"cluster of {NODES} nodes, 3 clients", "cluster", node_procs)]
        checks = {s.which: clients[0].call(client_check, s.which, br.experiment, br.number)
                  for s in sides}
        spread = clients[0].call(client_spread, br.experiment, br.number)
        for rep in range(args.reps + 1):  # round 0 warms up and is not counted
            for side in (sides[::-1] if rep % 2 else sides):
                if rep == 1:
                    side.reset()
                side.round(clients, procs, br)
    finally:
        for c in clients:
            c.close()

    one, many = sides
    same = checks["single"] == checks["cluster"]
    each = one.nbytes // CLIENTS
    print(f"\n  {CLIENTS} client processes at once, each Client.read(parallel={PARALLEL}) of the "
          f"whole {br.path.name} ({fmt_bytes(each)} of Arrow buffers); {args.reps} rounds, "
          f"taking turns in alternating order after one unmeasured; GB/s = all {CLIENTS} "
          f"reads' bytes / (last end - first start), median; CPU-s/GiB: median over the rounds "
          f"per GiB the clients received")
    print_table(["contender", "GB/s", "server CPU-s/GiB", "client CPU-s/GiB"],
                [[s.label, f"{s.gbps():.2f}", f"{s.cpu_per_gib():.2f}",
                  f"{median(s.client_cpu) * GiB / s.nbytes:.2f}"] for s in sides],
                right=(1, 2, 3))
    print(f"  the cluster's read equals the single server's (rows, fingerprint of every "
          f"column): {same}")

    print(f"\n  endpoints by first location (the cluster's plan of run {br.number}, each "
          f"endpoint read apart); CPU-s per GiB the node served itself ({CLIENTS} reads a round)")
    rows = []
    for i, node in enumerate(nodes):
        endpoints, nbytes = spread.get(node.location, [0, 0])
        cpu = median([r[i] for r in many.server_cpu])
        served = nbytes * CLIENTS
        rows.append([f"node {i + 1} {node.location}", endpoints, fmt_bytes(nbytes),
                     f"{many.cpu_per_gib(i):.2f}",
                     f"{cpu * GiB / served:.2f}" if served else "-", f"{cpu:.2f}"])
    others = {k: v for k, v in spread.items() if k not in {n.location for n in nodes}}
    rows += [[f"(not a node) {k}", v[0], fmt_bytes(v[1]), "-", "-", "-"]
             for k, v in others.items()]
    print_table(["node", "endpoints", "bytes a read", "CPU-s/GiB of all",
                 "CPU-s/GiB it served", "CPU-s a round"], rows, right=(1, 2, 3, 4, 5))
    print(f"  on this machine ({psutil.cpu_count()} CPUs) the nodes and the clients share the "
          "cores, so the aggregate cannot grow much; the per-node cost shows what a cluster of "
          "real machines gains")

    ratio = many.gbps() / one.gbps()
    verdict_line("3 nodes / 1 server, aggregate GB/s", f"{ratio:.2f}", "-", None)
    counts = "/".join(str(spread.get(n.location, [0])[0]) for n in nodes)
    return [
        Result(NAME, f"{CLIENTS} clients: cluster/single aggregate GB/s",
               f"{many.gbps():.2f}/{one.gbps():.2f} = {ratio:.2f}"),
        Result(NAME, "server CPU-s/GiB: cluster (all nodes)/single",
               f"{many.cpu_per_gib():.2f}/{one.cpu_per_gib():.2f}"),
        Result(NAME, "server CPU-s/GiB per node (of all bytes)",
               "/".join(f"{many.cpu_per_gib(i):.2f}" for i in range(NODES))),
        Result(NAME, "endpoints per node (first location)", counts),
        Result(NAME, "cluster read equals single read", str(same), "True", same),
    ]


# -- the benchmark -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Result]:
    from tests.cluster.postgres import Postgres  # Debian's postgresql, as the cluster tests

    section(f"cluster: planning at a node of {NODES}, and {NODES} nodes read by {CLIENTS} "
            f"clients")
    br = bench_run(args.size)
    multi = scalar_experiment(MULTI_RUNS, MULTI_EVENTS)
    warm = warm_cache(br.path)
    partition = partition_bytes(args.size)
    print(f"  run file {br.path.name}: {fmt_bytes(br.file_bytes)}, page cache warmed "
          f"({warm:.2f} GB/s); every server --partition-bytes {partition}")

    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        pg = Postgres()
        stack.callback(pg.remove)
        pg.init()
        print(f"  PostgreSQL {pg.bin.parent.name} at 127.0.0.1:{pg.port} "
              f"({time.perf_counter() - t0:.1f} s to start)", flush=True)
        single = stack.enter_context(our_server("cluster-single", partition_bytes=partition))
        nodes = [stack.enter_context(cluster_node(f"cluster-node{i + 1}", pg.url, partition))
                 for i in range(NODES)]
        t0 = time.perf_counter()
        wait_for_nodes(nodes, br)
        print(f"  {NODES} nodes plan with each other ({time.perf_counter() - t0:.1f} s after the "
              f"last started); logs bench-data/logs/cluster-*.log", flush=True)
        section("cluster: planning overhead")
        results = measure_each(NAME, [measure_planning], args, br, multi, single, nodes[0])
        section(f"cluster: {NODES} nodes read by {CLIENTS} client processes")
        results += measure_each(NAME, [measure_reads], args, br, single, nodes)
    return results
