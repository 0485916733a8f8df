"""Cluster mode: what planning over several nodes costs, three nodes read at once, and the
job queue shared by the nodes.

`--only cluster`. A real PostgreSQL (`tests/cluster/postgres.py`: Debian's `postgresql`, a fresh
cluster in a temporary directory on a free loopback port) holds the shared state (node registry,
live stream owners, job table); three nodes run `lclstream serve` with `--cluster --state-url
...`, otherwise the same command line as a single server beside them (authentication on, the
bench's token). All four serve one fresh data root under `bench-data/` (hard links of the bench
run and of `bench_scalars_4x10000`; removed at the end with the jobs' streams) with one state
directory of its own (copies of the bench's keys, so every node has the same keys; the single
server's SQLite job table; a settings file raising `job_limit`), and all run their jobs on one
Dask scheduler (`dask scheduler`, a process of its own; a cluster's nodes must share one), so
that the job queue's only difference is the shared table and the claiming. Every server of
this benchmark is started with `--partition-bytes` = `--size` / 16, so that the bench run has 16
endpoints: with the default 256 MiB a 128 MiB run (`--quick`) is one endpoint, which one node
would serve whole.

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
3. **The job queue, cluster against one server**: the scheduler's workers (`dask worker`, 2
   processes of 2 threads: the embedded LocalCluster's shape) start only now, so that they idle
   through no other measurement; a warm-up job at every server first (each connects to the
   scheduler on its first job). One-event jobs (`events=slice(i, i + 1)` of run 1 of
   `bench_scalars_4x10000`, each into a new stream), as bench/jobs.py's queue: 60 (30 with
   `--quick`) submitted back to back to the single server, and round-robin to the three nodes'
   clients, then all waited for; jobs/s from the first submit to the last `completed`
   transition. Then 10 (5) jobs one at a time for each, taking turns: the submit call, and
   submit to `running` and to `completed` (the server's transitions), p50/p90. Every job must
   have started once (`attempt` 1); the nodes that ran the cluster's jobs (status `node`) are
   counted, and how many ran on the node they were submitted to. CPU per job of the server
   processes, and of PostgreSQL's, over the burst. Each server keeps its own `jobs_running` (4),
   so the cluster runs up to 12 jobs at once on the same 4 worker threads where the single
   server runs 4; against that it pays PostgreSQL round trips for every submit, claim and
   transition, all under one advisory lock, and three more processes on the same cores. Target:
   cluster / single jobs/s >= 0.5 (0.77-0.97 measured on 2 cores): the shared table may cost
   each job more, but must not halve the queue's rate, as a lock held across slow work or
   nodes contending for claims would. A submit whose wake is lost (the job waits for a node's
   once-a-second look through the queue) shows in the one-at-a-time submit to `running`:
   about 0.5 s rather than ~10 ms (informational).

PostgreSQL is removed, every server and Dask process stopped and the data root removed at the
end, on an error or Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow.flight as flight

from bench.common import (
    DATA,
    EXPERIMENT,
    STATE,
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
    percentile,
    print_table,
    ready_all,
    scalar_experiment,
    section,
    verdict_line,
    warm_cache,
)
from bench.jobs import SERVER_SETTINGS, at, completed, link
from bench.live import fresh_dir
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
QUEUE_JOBS, QUEUE_JOBS_QUICK = 60, 30  # one-event jobs submitted back to back
ONE_JOBS, ONE_JOBS_QUICK = 10, 5  # one-event jobs one at a time, per side
TARGET_QUEUE_RATIO = 0.5  # cluster / single jobs/s
DASK_WORKERS = 2  # processes of 2 threads: the embedded LocalCluster's default shape


# -- servers -----------------------------------------------------------------------------------


def partition_bytes(size: int) -> int:
    return max(MiB, size // ENDPOINTS)


def prepare_root(root: Path, runs: list[Path]) -> None:
    """Make `root`, a fresh data root, hold hard links of `runs` (paths under the bench data
    root) and a state directory of its own: copies of the bench's keys (its token works, and
    the nodes sign and check tickets alike, as over the bench's state directory) and a settings
    file raising `job_limit` (8 a user by default, counted over the cluster's shared table)
    above the queue measurement's jobs. The job streams and the single server's job table go
    with `root`, so no later server resumes a job of this benchmark."""
    bench_token()  # the bench's signing secret, created if new, before it is copied
    state = root / ".state"
    state.mkdir(mode=0o700)
    for key in [*STATE.glob("*.key"), *STATE.glob("*.pem")]:
        shutil.copy2(key, state / key.name)
    for path in runs:
        link(path, root / path.relative_to(DATA))
    (state / "settings.toml").write_text("".join(f"{k} = {v!r}\n"
                                                 for k, v in SERVER_SETTINGS.items()))


def bench_server(name: str, root: Path, partition: int, scheduler: str,
                 *extra: str) -> ServerProcess:
    """`our_server`'s command line (auth on, the bench's token) over the fresh data root `root`
    and its state directory (`prepare_root`), running its jobs on the Dask scheduler
    `scheduler`; `extra`: `--cluster --state-url ...` for a node."""
    state = root / ".state"
    return ServerProcess(name, ["-m", "flight_server.cli", "serve", "--data", str(root),
                                "--port", "0", "--state-dir", str(state),
                                "--config", str(state / "settings.toml"),
                                "--partition-bytes", str(partition),
                                "--dask-scheduler", scheduler, *extra], token=bench_token())


class DaskProcess(ServerProcess):
    """`dask scheduler` or `dask worker` (the CLI's modules) in a process of its own, as a
    cluster runs them; ready once `count` lines `banner: tcp://...` are in its log (one a
    worker process); its `location` is the scheduler's address."""

    def __init__(self, name: str, args: list[str], banner: str, count: int = 1) -> None:
        super().__init__(name, ["-m", *args])
        self.banner = re.compile(banner + r":\s+(tcp://\S+)")
        self.count = count

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + self.timeout
        while len(self.banner.findall(self.log.read_text(errors="replace"))) < self.count:
            if time.monotonic() > deadline:
                raise self._fail(f"printed {self.banner.pattern!r} fewer than {self.count} times")
            time.sleep(0.05)


def dask_scheduler() -> DaskProcess:
    # its HTTP server starts even with --no-dashboard: on a free port, not another Dask's 8787
    return DaskProcess("cluster-dask-scheduler",
                       ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--dashboard-address", "127.0.0.1:0", "--no-dashboard"], "Scheduler at")


def dask_workers(scheduler: str) -> DaskProcess:
    """The embedded LocalCluster's shape (`--job-workers` 2 processes of 2 threads)."""
    return DaskProcess("cluster-dask-workers",
                       ["distributed.cli.dask_worker", scheduler, "--host", "127.0.0.1",
                        "--nworkers", str(DASK_WORKERS), "--nthreads", "2", "--no-dashboard"],
                       "Registered to", DASK_WORKERS)


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


# -- the job queue ------------------------------------------------------------------------------


@dataclass
class QueueSide:
    """The single server or the cluster taking one-event jobs; the cluster's are submitted to
    its nodes' clients in turn (round-robin)."""

    label: str
    tag: str  # begins its streams' names
    clients: list[Client]
    servers: list[psutil.Process]
    database: psutil.Process | None = None  # the cluster's PostgreSQL (its postmaster)
    burst: list[dict[str, Any]] = field(default_factory=list)  # the burst's statuses, when done
    seconds: float = 0.0  # first submit of the burst to its last 'completed'
    submit_s: float = 0.0  # submitting the burst
    server_cpu: float = 0.0  # of the server processes, over the burst
    database_cpu: float = 0.0  # of PostgreSQL's processes, over the burst
    alone: list[dict[str, Any]] = field(default_factory=list)  # one at a time: their statuses
    called: list[float] = field(default_factory=list)  # one at a time: the submit call
    started: list[float] = field(default_factory=list)  # one at a time: submit to 'running'
    done: list[float] = field(default_factory=list)  # one at a time: submit to 'completed'

    def submit(self, scalars: BenchRun, i: int, what: str) -> Any:
        # a new stream for every job: a job's `into` must not hold another's results
        return self.clients[i % len(self.clients)].submit(
            scalars.experiment, [scalars.number], events=slice(i, i + 1),
            into=(EXPERIMENT, f"{self.tag}-{what}-{i}"), end_run=False)

    def run_burst(self, scalars: BenchRun, n: int) -> None:
        """n jobs submitted back to back, then all waited for (bench/jobs.py's queue)."""
        cpu0, db0 = sum(cpu_seconds(p) for p in self.servers), tree_cpu(self.database)
        t0 = time.time()
        jobs = [self.submit(scalars, i, "queue") for i in range(n)]
        self.submit_s = time.time() - t0
        self.burst = [completed(j) for j in jobs]  # JobFailed if one failed
        self.server_cpu = sum(cpu_seconds(p) for p in self.servers) - cpu0
        self.database_cpu = tree_cpu(self.database) - db0
        self.seconds = max(at(st, "completed") for st in self.burst) - t0

    def run_one(self, scalars: BenchRun, i: int) -> None:
        t0 = time.time()
        job = self.submit(scalars, i, "one")
        self.called.append(time.time() - t0)
        status = completed(job)
        self.alone.append(status)
        self.started.append(at(status, "running") - t0)
        self.done.append(at(status, "completed") - t0)

    def rate(self) -> float:
        return len(self.burst) / self.seconds


def tree_cpu(proc: psutil.Process | None) -> float:
    """CPU seconds of a process and its children (PostgreSQL: a backend a connection)."""
    if proc is None:
        return 0.0
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(p)
    return total


def node_of(status: dict[str, Any]) -> str:
    """The location of the node that ran the job (a node's id is its location#instance)."""
    return (status["node"] or "-").split("#")[0]


def pcts(samples: list[float], qs: tuple[int, ...] = (50, 90)) -> str:
    return "/".join(f"{percentile(samples, q) * 1e3:.0f}" for q in qs)


def measure_queue(args: argparse.Namespace, scalars: BenchRun, single: ServerProcess,
                  nodes: list[ServerProcess], database: psutil.Process) -> list[Result]:
    n, k = (QUEUE_JOBS_QUICK, ONE_JOBS_QUICK) if args.quick else (QUEUE_JOBS, ONE_JOBS)
    with contextlib.ExitStack() as stack:
        one = [stack.enter_context(single.client())]
        members = [stack.enter_context(node.client()) for node in nodes]
        sides = [QueueSide("single server", "single", one, [psutil.Process(single.pid)]),
                 QueueSide(f"cluster of {NODES} nodes", "cluster", members,
                           [psutil.Process(node.pid) for node in nodes], database)]
        t0 = time.perf_counter()  # unmeasured: each server connects to the scheduler on its
        for side in sides:  # first job, and the workers import the job code
            for i in range(len(side.clients)):
                completed(side.submit(scalars, i, "warm-up"))
        warm = time.perf_counter() - t0
        for i in range(k):  # one job at a time, taking turns
            for side in sides:
                side.run_one(scalars, i)
        for side in sides:
            side.run_burst(scalars, n)

    single_side, cluster = sides
    print(f"  {n} one-event jobs (events i:i+1 of run {scalars.number} of {scalars.experiment}, "
          f"each into a new stream) submitted back to back, then all waited for; the "
          f"cluster's round-robin over its {NODES} nodes; every server on one Dask scheduler "
          f"({DASK_WORKERS} worker processes of 2 threads), jobs_running 4 each; a warm-up job "
          f"at every server first ({warm:.1f} s)")
    print_table(["contender", "jobs/s", "submits/s", "queued p50/p90 ms", "running p50 ms",
                 "servers CPU/job", "PostgreSQL CPU/job"],
                [[s.label, f"{s.rate():.1f}", f"{len(s.burst) / s.submit_s:.0f}",
                  pcts([at(st, "running") - at(st, "queued") for st in s.burst]),
                  pcts([at(st, "completed") - at(st, "running") for st in s.burst], (50,)),
                  ms(s.server_cpu / len(s.burst)),
                  ms(s.database_cpu / len(s.burst)) if s.database else "-"] for s in sides],
                right=(1, 2, 3, 4, 5, 6))
    print(f"\n  one job at a time ({k} each, taking turns; the cluster's to node 1, 2, 3 in "
          f"turn), from just before submit")
    print_table(["contender", "submit call p50/p90 ms", "to 'running'", "to 'completed'"],
                [[s.label, pcts(s.called), pcts(s.started), pcts(s.done)] for s in sides],
                right=(1, 2, 3))

    # Where the cluster's jobs ran: a node looks through the shared queue when a submit wakes
    # it and every second, and starts any queued job whose new stream no node owns yet (it
    # claims it), so a job runs on whichever node looked first, not always where it was sent.
    def here(statuses: list[dict[str, Any]]) -> int:
        return sum(node_of(st) == nodes[i % NODES].location for i, st in enumerate(statuses))

    ran = [node_of(st) for st in cluster.alone + cluster.burst]
    per_node = [ran.count(node.location) for node in nodes]
    counts = "/".join(map(str, per_node))
    print(f"  the cluster's {len(ran)} jobs ran on node 1/2/3: {counts}; on the node they were "
          f"submitted to: {here(cluster.alone)} of {k} one at a time, {here(cluster.burst)} of "
          f"{n} back to back")
    again = [st["job"] for s in sides for st in s.alone + s.burst if st["attempt"] != 1]
    if again:
        print(f"  WARNING: {len(again)} jobs started more than once: {again[:5]}",
              file=sys.stderr)

    ratio = cluster.rate() / single_side.rate()
    ok = ratio >= TARGET_QUEUE_RATIO
    verdict_line(f"{n} one-event jobs, cluster/single jobs/s", f"{ratio:.2f}",
                 f">= {TARGET_QUEUE_RATIO}", ok)
    p50 = [percentile(s.done, 50) for s in sides]
    return [
        Result(NAME, f"job queue: {n} one-event jobs, cluster/single jobs/s",
               f"{cluster.rate():.1f}/{single_side.rate():.1f} = {ratio:.2f}",
               f">= {TARGET_QUEUE_RATIO}", ok),
        Result(NAME, "job queue: one job, submit to completed p50, cluster/single",
               f"{ms(p50[1])}/{ms(p50[0])}"),
        Result(NAME, "job queue: every job started once (attempt 1)",
               "yes" if not again else f"no: {len(again)}", "yes", not again),
        Result(NAME, "job queue: cluster jobs run on node 1/2/3 (nodes used)",
               f"{counts} ({sum(c > 0 for c in per_node)})"),
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

    scalars = [DATA / multi / f"{multi}_Run{r:04d}.h5" for r in range(1, MULTI_RUNS + 1)]
    with contextlib.ExitStack() as stack:  # undone in reverse, on an error or Ctrl-C too
        root = stack.enter_context(fresh_dir("cluster"))
        prepare_root(root, [br.path, *scalars])
        t0 = time.perf_counter()
        pg = Postgres()
        stack.callback(pg.remove)
        pg.init()
        print(f"  PostgreSQL {pg.bin.parent.name} at 127.0.0.1:{pg.port} "
              f"({time.perf_counter() - t0:.1f} s to start)", flush=True)
        # Every server runs its jobs on this scheduler (a cluster's nodes must share one); its
        # workers start only for the job queue, so that they idle through no other measurement.
        scheduler = stack.enter_context(dask_scheduler()).location
        single = stack.enter_context(bench_server("cluster-single", root, partition, scheduler))
        nodes = [stack.enter_context(bench_server(f"cluster-node{i + 1}", root, partition,
                                                  scheduler, "--cluster", "--state-url", pg.url))
                 for i in range(NODES)]
        t0 = time.perf_counter()
        wait_for_nodes(nodes, br)
        print(f"  {NODES} nodes plan with each other ({time.perf_counter() - t0:.1f} s after the "
              f"last started); data root {root.relative_to(DATA.parent)} (hard links); logs "
              f"bench-data/logs/cluster-*.log", flush=True)
        section("cluster: planning overhead")
        results = measure_each(NAME, [measure_planning], args, br, multi, single, nodes[0])
        section(f"cluster: {NODES} nodes read by {CLIENTS} client processes")
        results += measure_each(NAME, [measure_reads], args, br, single, nodes)
        section(f"cluster: the job queue, {NODES} nodes against one server")
        stack.enter_context(dask_workers(scheduler))
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        results += measure_each(NAME, [measure_queue], args, BenchRun(multi, 1, scalars[0]),
                                single, nodes, psutil.Process(postmaster))
    return results
