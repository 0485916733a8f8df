"""Data-request jobs: what running a request as a job costs against serving it by DoGet, how
soon a job's first results are readable, and how many small jobs the queue gets through.

Three measurements, each against its target, on one server process of ours (authentication
on) whose jobs run on its embedded Dask LocalCluster (started by the server on first use; one
unmeasured warm-up job starts it and loads the workers first):

1. **Job throughput**: `peaks` + `hits` over the `--size` bench run's 1 MiB `epix/image`
   frames (512x1024 uint16, the bench generator's run, as in throughput), submitted as a job
   into a live stream (`end_run=False`), timed from just before `submit` to the job's
   `completed` transition; against the same request through GetFlightInfo + DoGet of all its
   endpoints (`Client.read`, endpoints in parallel) from the same server. Both take turns,
   GB/s are of the request's source bytes (the frames and timestamps read: the plan of the
   request without processing); the results must be the same (events and peaks). Target:
   job / DoGet >= 0.9.
2. **Submit to first result**: from just before `submit` to the first batch that a
   `Subscription` to the job's stream (from "earliest", retried while the stream does not exist
   yet) yields, for jobs of the same request over the run's first 128 frames (two tasks of
   64 MiB), one at a time, each waited for; p50 / p90. Target: p50 < 1 s.
3. **Queue overhead**: one-event jobs (`events=slice(i, i + 1)` of a run of scalars, each into
   a stream of its own) submitted back to back, then all waited for; jobs/s from the first
   submit to the last `completed` transition. Target: >= 20 jobs/s.

The server runs over a fresh data root under `bench-data/` (removed at the end) holding hard
links to the source runs, with a state directory of its own (the job table is there, so no job
of an interrupted bench is resumed by another benchmark's server) that holds a copy of the
bench's signing secret, so the bench's token works. Its settings (a TOML file) raise
`job_limit` above the queue measurement's jobs and keep the defaults of the rest; the
environment's `LCLSTREAM_*` variables still win, as always. Times of the server's transitions
(`time.time()` on the same machine) explain where a job's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    DATA,
    STATE,
    BenchRun,
    GiB,
    Result,
    ServerProcess,
    bench_run,
    bench_token,
    cpu_seconds,
    fmt_bytes,
    gbps,
    median,
    percentile,
    print_table,
    scalar_experiment,
    section,
    verdict_line,
    warm_cache,
)
from bench.live import fresh_dir
from clients import Client
from flight_server import config

NAME = "jobs"
EXPERIMENT = "bench"
TARGET_RATIO = 0.9  # job / DoGet, GB/s of source data
TARGET_FIRST = 1.0  # seconds, p50 from submit to the first result batch
TARGET_RATE = 20.0  # one-event jobs completed per second

FRAMES = "epix/image"  # 512x1024 uint16: 1 MiB a frame
COLUMNS = ["timestamp", FRAMES]
# The crystallography notebook's parameters (notebooks/05_crystallography.ipynb).
STEPS = [{"step": "peaks", "column": FRAMES, "snr": 5, "min_pixels": 2, "radius": 3},
         {"step": "hits", "column": f"{FRAMES}/n_peaks", "min": 10}]
FIRST_EVENTS = 128  # source events of a first-result job: two 64 MiB tasks
QUEUE_SCALARS = (4, 10_000)  # the sql benchmark's small-query experiment; its run 1 is read

# The server's settings; the rest are the defaults (jobs_running 4, job_workers 2,
# job_partition_bytes 64 MiB, partition_bytes 256 MiB).
SERVER_SETTINGS: dict[str, Any] = {"job_limit": 1000}
KEYS = ("token-hs256.key", "token-ed25519.pem")  # the signing secrets a state directory holds
WAIT_POLL = 0.1  # seconds between status calls while waiting (times come from transitions)
IDLE_S = 3.0  # seconds the idle cluster's own CPU use is measured
FIRST_TIMEOUT = 60.0  # seconds a job's stream may take to appear and yield its first batch


@dataclass(frozen=True)
class Sizes:
    reps: int  # throughput: rounds of (job, DoGet), taking turns
    first_jobs: int  # submit-to-first-result samples
    queue_jobs: int  # one-event jobs

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(reps=2, first_jobs=5, queue_jobs=50)
        return cls(reps=3, first_jobs=20, queue_jobs=200)


# -- the server ----------------------------------------------------------------------------


def link(src: Path, dst: Path) -> None:
    """`src` at `dst` without copying it: a hard link (same file system), else a symlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        dst.symlink_to(src.resolve())


class JobsServer(ServerProcess):
    """`lclstream serve` (authentication on, the bench's token) over the fresh data root `root`,
    holding `runs` (hard links), with a state directory `root/.state` of its own and the
    settings file `root/.state/settings.toml` (SERVER_SETTINGS)."""

    def __init__(self, root: Path, runs: list[BenchRun]) -> None:
        token = bench_token()  # creates the bench's signing secret in STATE if it is new
        state = root / ".state"
        state.mkdir(mode=0o700)
        for key in KEYS:
            if (STATE / key).exists():
                shutil.copy2(STATE / key, state / key)
        for run in runs:
            link(run.path, root / run.experiment / run.path.name)
        self.config_file = state / "settings.toml"
        self.config_file.write_text("".join(f"{k} = {v!r}\n"
                                            for k, v in SERVER_SETTINGS.items()))
        super().__init__("lclstream-jobs", ["-m", "flight_server.cli", "serve", "--data",
                                             str(root), "--port", "0", "--state-dir", str(state),
                                             "--config", str(self.config_file)], token=token)
        # what the server will run with: the file, under the environment, as it loads them
        self.settings = config.load(self.config_file, {"data": root, "state_dir": state})

    def processes(self) -> tuple[psutil.Process, list[psutil.Process]]:
        """The server process and its descendants (the Dask nannies and workers; the scheduler
        runs in the server process)."""
        server = psutil.Process(self.pid)
        return server, server.children(recursive=True)


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of processes: user + system, and system apart (page faults show there)."""

    total: float
    system: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.total - other.total, self.system - other.system)

    def per_gib(self, nbytes: int) -> str:
        return f"{self.total * GiB / nbytes:.2f} ({self.system * GiB / nbytes:.2f})"


def cpu(procs: list[psutil.Process]) -> Cpu:
    total = system = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(p)
            system += p.cpu_times().system
    return Cpu(total, system)


def idle_cpu(server: JobsServer) -> str:
    """What the server process and the Dask workers burn while no job runs, in % of a core."""
    proc, workers = server.processes()
    s0, w0 = cpu([proc]), cpu(workers)
    time.sleep(IDLE_S)
    return (f"server {(cpu([proc]) - s0).total / IDLE_S:.1%}, workers "
            f"{(cpu(workers) - w0).total / IDLE_S:.1%} of a core")


# -- jobs ----------------------------------------------------------------------------------


def at(status: dict[str, Any], state: str) -> float:
    """The time (Unix seconds) of the job's last transition into `state`."""
    times = [t["at"] for t in status["transitions"] if t["state"] == state]
    if not times:
        raise RuntimeError(f"job {status['job']} was never {state}: {status['state']}, "
                           f"{status.get('error')}")
    return dt.datetime.fromisoformat(times[-1]).timestamp()


def completed(job: Any) -> dict[str, Any]:
    """Wait for the job (polled every WAIT_POLL s); its status; JobFailed if it failed."""
    return job.wait(progress=False, poll=WAIT_POLL)


def _not_yet(exc: Exception) -> bool:
    """Whether a subscription failed only because the job's producer has not made its stream
    yet."""
    return "no live stream" in str(exc) or "has no events yet" in str(exc)


def first_batch(client: Client, stream: str) -> Any:
    """The first batch a subscription to the stream yields, from "earliest"; NOT_FOUND (no
    stream yet) is retried every 2 ms."""
    deadline = time.monotonic() + FIRST_TIMEOUT
    while True:
        sub = client.subscribe(EXPERIMENT, stream, from_="earliest")
        try:
            for batch in sub:
                return batch
            raise RuntimeError(f"stream {stream} ended without a batch")
        except Exception as exc:
            if not _not_yet(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.002)
        finally:
            sub.close()


def peaks_total(batches: Iterator[Any]) -> tuple[int, int]:
    """(events, peaks) of result batches."""
    events = peaks = 0
    for batch in batches:
        events += batch.num_rows
        peaks += sum(v for v in batch.column(f"{FRAMES}/n_peaks").to_pylist() if v)
    return events, peaks


# -- 1. job throughput ---------------------------------------------------------------------


@dataclass
class Contender:
    label: str
    seconds: list[float] = field(default_factory=list)
    server_cpu: list[Cpu] = field(default_factory=list)
    worker_cpu: list[Cpu] = field(default_factory=list)
    results: set[tuple[int, int]] = field(default_factory=set)  # (events, peaks) of each read


def mid(samples: list[Cpu]) -> Cpu:
    """The sample of median total CPU."""
    return sorted(samples, key=lambda c: c.total)[len(samples) // 2]


def throughput(sizes: Sizes, server: JobsServer, client: Client, run: BenchRun) -> list[Result]:
    source = client.plan(EXPERIMENT, [run.number], COLUMNS)
    nbytes, events = source.total_bytes, source.total_records
    section(f"jobs: throughput, peaks + hits over {events} frames of 1 MiB "
            f"({fmt_bytes(nbytes)} of source data)")
    plan = client.plan(EXPERIMENT, [run.number], COLUMNS, processing=STEPS)
    print(f"  the idle cluster: {idle_cpu(server)}", flush=True)
    proc, workers = server.processes()
    job_c, doget_c = Contender("job (submit to completed)"), Contender(
        f"GetFlightInfo + DoGet, {len(plan.endpoints)} endpoints (Client.read, parallel=4)")

    def measure(c: Contender, fn: Callable[[], tuple[float, Callable[[], tuple[int, int]]]]
                ) -> None:
        s0, w0 = cpu([proc]), cpu(workers)
        seconds, result = fn()
        c.seconds.append(seconds)
        c.server_cpu.append(cpu([proc]) - s0)
        c.worker_cpu.append(cpu(workers) - w0)
        c.results.add(result())  # checked after the CPU is taken

    def job(rep: int) -> tuple[float, Callable[[], tuple[int, int]]]:
        stream = f"throughput-{rep}"
        t0 = time.time()
        j = client.submit(EXPERIMENT, [run.number], COLUMNS, processing=STEPS,
                          into=(EXPERIMENT, stream), end_run=False)
        seconds = at(completed(j), "completed") - t0
        return seconds, lambda: peaks_total(j.read().to_batches())  # the stream, read back

    def doget(rep: int) -> tuple[float, Callable[[], tuple[int, int]]]:
        t0 = time.perf_counter()
        table = client.read(EXPERIMENT, [run.number], COLUMNS, processing=STEPS)
        seconds = time.perf_counter() - t0
        return seconds, lambda: peaks_total(table.to_batches())

    for rep in range(sizes.reps):  # taking turns; the warm-up job ran before
        measure(job_c, lambda rep=rep: job(rep))
        measure(doget_c, lambda rep=rep: doget(rep))

    rows = []
    for c in (doget_c, job_c):
        rows.append([c.label, f"{gbps(nbytes, min(c.seconds)):.2f}",
                     f"{gbps(nbytes, median(c.seconds)):.2f}", f"{median(c.seconds):.2f} s",
                     mid(c.server_cpu).per_gib(nbytes), mid(c.worker_cpu).per_gib(nbytes),
                     ", ".join(f"{e}/{p}" for e, p in sorted(c.results))])
    print(f"  {sizes.reps} rounds, taking turns; GB/s of source data; CPU: seconds per GiB of "
          f"source data (of which system), median, of the server process (with the Dask "
          f"scheduler) and of the Dask workers; result: events / peaks")
    print_table(["contender", "best GB/s", "median GB/s", "median time", "server CPU",
                 "workers CPU", "result"], rows, right=(1, 2, 3, 4, 5))
    same = len(job_c.results | doget_c.results) == 1
    job_gbps, doget_gbps = gbps(nbytes, median(job_c.seconds)), gbps(nbytes,
                                                                       median(doget_c.seconds))
    ratio = job_gbps / doget_gbps
    ok = ratio >= TARGET_RATIO and same
    if not same:
        print(f"  WARNING: the results differ: job {job_c.results}, DoGet {doget_c.results}",
              file=sys.stderr)
    verdict_line("job / DoGet (median GB/s of source)", f"{ratio:.2f}", f">= {TARGET_RATIO}", ok)
    return [
        Result(NAME, "peaks+hits job / DoGet (GB/s of source)",
               f"{job_gbps:.2f}/{doget_gbps:.2f} = {ratio:.2f}", f">= {TARGET_RATIO}", ok),
        Result(NAME, "same results, job and DoGet", "yes" if same else "no", "yes", same),
    ]


# -- 2. submit to first result -------------------------------------------------------------


def first_results(sizes: Sizes, client: Client, run: BenchRun) -> list[Result]:
    n_events = min(FIRST_EVENTS, client.plan(EXPERIMENT, [run.number], COLUMNS).total_records)
    section(f"jobs: submit to first result batch, {sizes.first_jobs} jobs of peaks + hits over "
            f"{n_events} frames")
    first, submit_s, started, first_after_start, total = [], [], [], [], []
    for i in range(sizes.first_jobs):
        stream = f"first-{i}"
        t0, p0 = time.time(), time.perf_counter()
        job = client.submit(EXPERIMENT, [run.number], COLUMNS, events=slice(0, n_events),
                            processing=STEPS, into=(EXPERIMENT, stream), end_run=False)
        p1 = time.perf_counter()
        first_batch(client, stream)
        p2 = time.perf_counter()
        status = completed(job)
        running = at(status, "running") - t0
        first.append(p2 - p0)
        submit_s.append(p1 - p0)
        started.append(running)
        first_after_start.append(p2 - p0 - running)
        total.append(at(status, "completed") - t0)
    print("  one job at a time, each waited for before the next; a subscriber (this process) "
          "from \"earliest\", retrying every 2 ms until the stream exists")
    rows = [[label, *(f"{percentile(xs, q) * 1e3:.0f}" for q in (50, 90)), f"{max(xs) * 1e3:.0f}"]
            for label, xs in (("submit to first result batch", first),
                              ("  submit call (its answer)", submit_s),
                              ("  submit to 'running' (server's transition)", started),
                              ("  'running' to first result batch", first_after_start),
                              ("submit to 'completed'", total))]
    print_table(["ms", "p50", "p90", "max"], rows, right=(1, 2, 3))
    p50, p90 = percentile(first, 50), percentile(first, 90)
    ok = p50 < TARGET_FIRST
    verdict_line("submit to first result batch, p50", f"{p50 * 1e3:.0f} ms",
                 f"< {TARGET_FIRST * 1e3:.0f} ms", ok)
    return [Result(NAME, "submit to first result, p50 (p90)",
                   f"{p50 * 1e3:.0f} ms ({p90 * 1e3:.0f})", f"< {TARGET_FIRST * 1e3:.0f} ms",
                   ok)]


# -- 3. queue overhead ---------------------------------------------------------------------


def queue_overhead(sizes: Sizes, server: JobsServer, client: Client,
                   scalars: BenchRun) -> list[Result]:
    n = sizes.queue_jobs
    s = server.settings
    section(f"jobs: queue overhead, {n} one-event jobs submitted back to back "
            f"(jobs_running {s.jobs_running}, {s.job_workers} workers)")
    streams = len(client.streams(EXPERIMENT))
    proc, workers = server.processes()
    s0, w0 = cpu([proc]), cpu(workers)
    t0 = time.time()
    jobs = []
    for i in range(n):
        jobs.append(client.submit(scalars.experiment, [scalars.number], events=slice(i, i + 1),
                                  into=(EXPERIMENT, f"queue-{i}"), end_run=False))
    submitted = time.time() - t0
    statuses, failed = [], []
    for job in jobs:
        try:
            statuses.append(completed(job))
        except Exception as exc:
            failed.append(f"{type(exc).__name__}: {exc}")
    server_cpu, worker_cpu = (cpu([proc]) - s0).total, (cpu(workers) - w0).total
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} jobs failed, the first: {failed[0]}")
    ends = [at(st, "completed") for st in statuses]
    seconds = max(ends) - t0
    rate = n / seconds
    waited = [at(st, "running") - at(st, "queued") for st in statuses]
    ran = [at(st, "completed") - at(st, "running") for st in statuses]
    events = sum(st["progress"]["events"] for st in statuses)
    print(f"  {n} jobs into {n} new streams of {EXPERIMENT} (which held {streams}); run "
          f"{scalars.number} of {scalars.experiment} (scalars), one event each ({events} source "
          f"events done in all)")
    print(f"  submitting took {submitted:.2f} s ({n / submitted:.0f} submits/s); the last "
          f"completed {seconds:.2f} s after the first submit; CPU: server process "
          f"{server_cpu:.2f} s, Dask workers {worker_cpu:.2f} s "
          f"({(server_cpu + worker_cpu) / n * 1e3:.0f} ms a job)")
    rows = [[label, *(f"{percentile(xs, q) * 1e3:.0f}" for q in (50, 90)), f"{max(xs) * 1e3:.0f}"]
            for label, xs in (("queued (submitted to 'running')", waited),
                              ("running ('running' to 'completed')", ran))]
    print_table(["ms per job", "p50", "p90", "max"], rows, right=(1, 2, 3))
    ok = rate >= TARGET_RATE
    verdict_line(f"{n} one-event jobs, jobs/s", f"{rate:.1f}", f">= {TARGET_RATE:g}", ok)
    return [Result(NAME, f"queue: {n} one-event jobs (jobs/s)", f"{rate:.1f}",
                   f">= {TARGET_RATE:g}", ok)]


# -- the benchmark -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Result]:
    sizes = Sizes.of(args.quick)
    source = bench_run(args.size)
    name = scalar_experiment(*QUEUE_SCALARS)
    scalars = BenchRun(name, 1, DATA / name / f"{name}_Run0001.h5")
    warm_cache(source.path)
    results: list[Result] = []
    with fresh_dir("jobs") as root, JobsServer(root, [source, scalars]) as server, \
            server.client() as client:
        s = server.settings
        print(f"  server: jobs_running {s.jobs_running}, job_workers {s.job_workers} "
              f"(embedded LocalCluster, 2 threads each), job_partition_bytes "
              f"{fmt_bytes(s.job_partition_bytes)}, partition_bytes "
              f"{fmt_bytes(s.partition_bytes)}, job_limit {s.job_limit}; log "
              f"{server.log.relative_to(DATA.parent)}", flush=True)
        if s.job_limit < sizes.queue_jobs:
            raise RuntimeError(f"job_limit is {s.job_limit} (from the environment?); the queue "
                               f"measurement submits {sizes.queue_jobs} jobs at once")
        t0 = time.perf_counter()  # the warm-up: the cluster starts, its workers load
        warm = client.submit(EXPERIMENT, [source.number], COLUMNS,
                             events=slice(0, FIRST_EVENTS), processing=STEPS,
                             into=(EXPERIMENT, "warm-up"), end_run=False)
        completed(warm)
        client.read(EXPERIMENT, [source.number], COLUMNS, events=slice(0, FIRST_EVENTS),
                    processing=STEPS)
        print(f"  warm-up job (the Dask cluster starts) and DoGet: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        parts = [
            ("throughput", lambda: throughput(sizes, server, client, source)),
            ("first result", lambda: first_results(sizes, client, source)),
            ("queue", lambda: queue_overhead(sizes, server, client, scalars)),
        ]
        for label, part in parts:
            try:
                results += part()
            except Exception as exc:  # one broken part must not hide the others' figures
                print(f"  jobs {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                results.append(Result(NAME, label, f"error: {type(exc).__name__}",
                                      "completes", False))
    return results
