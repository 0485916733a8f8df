"""Shared plumbing for the benchmarks: bench data, server and client processes, timing and
reporting.

Servers run in their own processes, as in production, so that their CPU time, GIL and memory
are not mixed up with the client's; data lives under `bench-data/` and is reused between runs.
Our server runs with authentication on, as in production: the bench mints one token for all its
clients, signed with the secret the servers share in `bench-data/.lclstream-bench/`. Clients
that must not share the bench process (its heap, GIL, allocators) run in `ClientProcess`es.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pyarrow.flight as flight

from bench import SET_FOR_CLIENT
from clients import Client, connect
from clients.credentials import BearerToken
from flight_server import config
from flight_server.generator.bench import generate_bench_run, generate_scalar_run
from flight_server.security.assembly import minter_for
from flight_server.security.grants import ALL

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
LOGS = DATA / "logs"
STATE = DATA / ".lclstream-bench"  # our servers' secrets; a dot name is no experiment
EXPERIMENT = "bench"
MiB = 2**20
GiB = 2**30
HUGE_PARTITION = 2**40  # larger than any run: the plan has one endpoint, the read one DoGet

T = TypeVar("T")


# -- sizes and formatting ------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def gbps(nbytes: float, seconds: float) -> float:
    """Decimal GB/s, the unit network and disk figures are usually quoted in."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; enough for tens of samples."""
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def cpu_seconds(proc: psutil.Process | None) -> float:
    """User + system CPU time of a process so far (0 for none)."""
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


@dataclass
class Contender:
    """One way of moving the data; `fetch` returns the bytes it delivered. CPU time of the
    client (the measuring process, or `clients` where the reads run in processes of their own)
    and of the server is kept per read: on a small machine they compete for the same cores, so
    CPU seconds per GiB explain the wall-clock figures."""

    label: str
    fetch: Callable[[], int]
    server: psutil.Process | None = None
    clients: list[psutil.Process] = field(default_factory=list)  # [] : the measuring process
    seconds: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    nbytes: int = 0

    def measure(self, client: psutil.Process) -> None:
        clients = self.clients or [client]
        c0, s0 = sum(cpu_seconds(p) for p in clients), cpu_seconds(self.server)
        seconds, self.nbytes = timed(self.fetch)
        self.seconds.append(seconds)
        self.client_cpu.append(sum(cpu_seconds(p) for p in clients) - c0)
        self.server_cpu.append(cpu_seconds(self.server) - s0)

    def reset(self) -> None:
        self.seconds.clear()
        self.client_cpu.clear()
        self.server_cpu.clear()

    def best(self) -> float:
        return gbps(self.nbytes, min(self.seconds))

    def median(self) -> float:
        return gbps(self.nbytes, median(self.seconds))


def keep_freed_memory() -> bool:
    """Make glibc malloc in this process keep what is freed for reuse, as `bench/__init__.py`
    makes mimalloc: Flight hands the client gRPC's receive buffers (glibc malloc) as the result's
    Arrow buffers, without a copy, and glibc returns a freed gigabyte to the OS (heap trim,
    munmap), so every read of it would page-fault it in anew, about 1 CPU-s a GiB. Trimming off;
    blocks up to 32 MiB (the most glibc allows; batches are smaller) from the heap, not mmap.
    Call it first thing in a client process; False where the C library is not glibc."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_trim_threshold, -1) and mallopt(m_mmap_threshold, 32 * MiB))


# -- reporting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One line of the final summary: a measured figure and, where there is one, its target."""

    bench: str
    metric: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: informational, no target

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.ok]


def measure_each(bench: str, measures: Sequence[Callable[..., list[Result]]],
                 *args: object) -> list[Result]:
    """The results of each measure(*args); one that fails is reported as a failed line, so it
    does not hide the other figures."""
    results: list[Result] = []
    for measure in measures:
        try:
            results += measure(*args)
        except Exception as exc:
            print(f"  {measure.__name__} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.append(Result(bench, measure.__name__, f"error: {type(exc).__name__}",
                                  "completes", False))
    return results


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                right: Sequence[int] = ()) -> None:
    """Columns padded to their widest cell; indices in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  " + "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  " + "  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


def verdict_line(label: str, value: str, target: str, ok: bool | None) -> None:
    mark = {True: "PASS", False: "FAIL", None: "info"}[ok]
    print(f"  {label:<44} {value:>14}   target {target:<12} {mark}", flush=True)


# -- bench data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRun:
    experiment: str
    number: int
    path: Path

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def bench_run(size: int) -> BenchRun:
    """The bench run of about `size` bytes, written on first use. Its run number is its size in
    MiB, so runs of several sizes sit side by side in one experiment and are all served."""
    number = max(1, round(size / MiB))
    path = DATA / EXPERIMENT / f"{EXPERIMENT}_Run{number:04d}.h5"
    if not path.exists():
        print(f"  generating {fmt_bytes(size)} bench run {path.relative_to(ROOT)} ...", flush=True)
    generate_bench_run(path, size)
    return BenchRun(EXPERIMENT, number, path)


WAVEFORM_SAMPLES = 8192  # float32 samples per event: 32 KiB of waveform an event
WAVEFORM_FRAME = (16, 16)  # the smallest frames the generator draws: the run is its waveforms


def waveform_run(size: int) -> BenchRun:
    """A bench run whose `tof/waveforms` column alone holds at least `size` bytes, written on
    first use in experiment `bench_waveforms`, run number its size in MiB. The runs of
    `bench_run` hold 32 MiB of waveforms a GiB beside 1 MiB `epix/image` frames; this is the same
    generator with 16x16 frames."""
    number = max(1, round(size / MiB))
    experiment = f"{EXPERIMENT}_waveforms"
    path = DATA / experiment / f"{experiment}_Run{number:04d}.h5"
    wave_bytes = WAVEFORM_SAMPLES * 4
    events = -(-size // wave_bytes)
    per_event = WAVEFORM_FRAME[0] * WAVEFORM_FRAME[1] * 2 + wave_bytes + 16  # as bench_events
    if not path.exists():
        print(f"  generating {events} events of waveforms {path.relative_to(ROOT)} ...",
              flush=True)
    generate_bench_run(path, events * per_event, frame_shape=WAVEFORM_FRAME,
                       tof_samples=WAVEFORM_SAMPLES)
    return BenchRun(experiment, number, path)


def scalar_experiment(runs: int, events_per_run: int) -> str:
    """An experiment of `runs` LCLS2 runs (numbered from 1) of `events_per_run` events of scalar
    columns only, written on first use; its name, `bench_scalars_<runs>x<events>`, says its
    size, so experiments of several sizes sit side by side. Returns the name."""
    name = f"{EXPERIMENT}_scalars_{runs}x{events_per_run}"
    for number in range(1, runs + 1):
        path = DATA / name / f"{name}_Run{number:04d}.h5"
        if not path.exists():
            print(f"  generating {events_per_run} scalar events {path.relative_to(ROOT)} ...",
                  flush=True)
        generate_scalar_run(path, number, events_per_run)
    return name


def warm_cache(path: Path, block: int = 16 * MiB) -> float:
    """Read the whole file once so every contender reads from the page cache, not the disk;
    returns the GB/s of that read (low on the first run after generation or a reboot)."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            total += n
    return gbps(total, time.perf_counter() - t0)


# -- server processes ----------------------------------------------------------------------

BANNER = re.compile(r"serving .* at (grpc://\S+)")


class ServerProcess:
    """A Flight server in a subprocess: started, awaited until it answers, always stopped.

    Its output goes to `bench-data/logs/NAME.log` rather than a pipe that nobody drains, and
    it gets the user's environment, without the client-only settings of `bench/__init__.py`.
    """

    def __init__(self, name: str, args: Sequence[str], timeout: float = 120.0,
                 token: str | None = None) -> None:
        self.name = name
        self.args = [sys.executable, *args]
        self.timeout = timeout
        self.token = token  # sent on every call of the clients below; None: the server needs none
        self.log = LOGS / f"{name}.log"
        self.location = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> ServerProcess:
        LOGS.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in SET_FOR_CLIENT}
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.location = self._wait_banner()
            self._wait_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flight_client(self) -> flight.FlightClient:
        """A bare pyarrow client that sends the server's token, if it needs one."""
        middleware = [BearerToken(self.token)] if self.token else []
        return flight.connect(self.location, middleware=middleware)

    def client(self) -> Client:
        """Our high-level client. Without a token it could pick one up from the keyring or
        $LCLSTREAM_TOKEN; that only adds a header, which a server without auth ignores."""
        return connect(self.location, self.token)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _fail(self, why: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-2000:]
        return RuntimeError(f"server '{self.name}' {why}; log {self.log}:\n{tail}")

    banner = BANNER  # the line that says where it serves

    def _wait_banner(self) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            match = self.banner.search(self.log.read_text(errors="replace"))
            if match:
                return match.group(1)
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._fail(f"exited with status {self._proc.returncode}")
            time.sleep(0.05)
        raise self._fail(f"printed no line matching {self.banner.pattern!r} in "
                         f"{self.timeout:.0f} s")

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + self.timeout
        client = self.flight_client()
        try:
            while True:
                try:
                    list(client.list_actions())
                    return
                except flight.FlightUnavailableError:  # not listening yet; anything else answers
                    if time.monotonic() > deadline:
                        raise self._fail("does not answer") from None
                    time.sleep(0.05)
        finally:
            client.close()


@cache
def bench_token() -> str:
    """One token for every client of the run, read-all and outliving any run. Minted from the
    settings the server will load (environment included), so the server accepts it; the secret
    is created in STATE on first use, before any server starts."""
    settings = config.load(overrides={"data": DATA, "state_dir": STATE})
    return minter_for(settings).mint("bench", ALL, 24 * 3600)


def our_server(name: str = "lclstream", *, partition_bytes: int | None = None,
               batch_bytes: int | None = None, auth: bool = True) -> ServerProcess:
    """`lclstream serve` over the bench data root, on a free port; with authentication on
    unless `auth` is False (`--no-auth`, to measure what authentication costs)."""
    args = ["-m", "flight_server.cli", "serve", "--data", str(DATA), "--port", "0",
            "--state-dir", str(STATE)]
    if not auth:
        args.append("--no-auth")
    if partition_bytes is not None:
        args += ["--partition-bytes", str(partition_bytes)]
    if batch_bytes is not None:
        args += ["--batch-bytes", str(batch_bytes)]
    return ServerProcess(name, args, token=bench_token() if auth else None)


def reference_server(run: BenchRun | None = None, *, live: bool = False,
                     name: str = "reference") -> ServerProcess:
    """The bare Flight server of bench/reference_server.py (no authentication): holding `run`
    in memory for DoGet, and/or, with `live`, taking live streams (DoPut acked at once, relayed
    to subscriptions in memory)."""
    args = ["-m", "bench.reference_server", "--port", "0"]
    if run is not None:
        args += ["--file", str(run.path), "--experiment", run.experiment, "--run",
                 str(run.number)]
    if live:
        args.append("--live")
    return ServerProcess(name, args)


def environment() -> str:
    """One line on what the figures were measured on; they mean little without it."""
    import numpy as np
    import pyarrow as pa

    mem = psutil.virtual_memory().total
    return (f"python {sys.version.split()[0]}, pyarrow {pa.__version__}, numpy {np.__version__}, "
            f"{os.cpu_count()} CPUs, {fmt_bytes(mem)} RAM")


def machine_load(seconds: float = 1.0) -> str:
    """CPU use by everything on the machine over a moment, with a warning when it is busy:
    on a small machine another process's work shows up as noise in every figure."""
    busy = psutil.cpu_percent(interval=seconds)
    line = f"machine CPU use {busy:.0f}%, load average {os.getloadavg()[0]:.2f}"
    if busy > 10:
        line += "  WARNING: other processes are busy; figures will be noisy"
    return line


# -- client processes ----------------------------------------------------------------------

_kept: dict[object, Any] = {}  # in a client process: what its calls keep, closed at its end


def kept(key: object, make: Callable[[], T] | None = None) -> T:
    """In a client process: the object kept under `key` (a connection), made by `make` on first
    use and closed (its `close()`) when the process ends, so that later calls reuse it as a
    long-lived client does and only the first pays for connecting. Without `make` it must have
    been made already (by the process's setup, say)."""
    if key not in _kept:
        if make is None:
            raise KeyError(f"nothing kept as {key!r} in this process")
        _kept[key] = make()
    return _kept[key]


def _error(exc: BaseException) -> tuple[str, str]:
    return "error", f"{type(exc).__name__}: {exc}"


def _client_main(pipe, setup: Callable[..., object] | None, args: tuple) -> None:
    """The body of a client process: keep freed memory, run `setup(*args)`, answer ready, then
    run each (function, args, kwargs) received (None ends), answering ("ok", its result) or
    ("error", message); close what was kept."""
    keep_freed_memory()
    try:
        try:
            if setup is not None:
                setup(*args)
        except Exception as exc:
            pipe.send(_error(exc))
            return
        pipe.send(("ok", None))
        while (work := pipe.recv()) is not None:
            fn, fn_args, fn_kwargs = work
            try:
                answer = ("ok", fn(*fn_args, **fn_kwargs))  # what fn made and dropped is freed
            except Exception as exc:
                answer = _error(exc)
            pipe.send(answer)
            del answer, work, fn_args, fn_kwargs
    finally:
        for obj in reversed(list(_kept.values())):
            with contextlib.suppress(Exception):
                obj.close()
        _kept.clear()


class ClientProcess:
    """A benchmark client in a process of its own, for the benchmarks that run clients beside
    this process (sql, live). Spawned, so it inherits none of this process's heap, threads or
    gRPC state, and kept for many calls, so that what they keep (`kept`: connections) and its
    allocators' state carry over from call to call; it keeps glibc's freed memory
    (`keep_freed_memory`). `setup(*args)` runs in it first, if given.

    `start(fn, *args, **kwargs)` sends a call of the module-level function `fn` (pickled by
    name) and returns at once, `result()` waits for the answer of the oldest call unanswered,
    `call` does both; calls run one at a time, in order. An error in the process, its death or
    no answer within `timeout` seconds is raised as a RuntimeError naming the process.

        clients = ready_all([ClientProcess(f"fetch-{i}", connect, location) for i in range(4)])
        for c in clients:
            c.start(fetch, query)
        answers = gather(clients)

    Calls and answers travel over a pipe, answers read only when asked for, so no thread of this
    process handles them while timed code runs (a `ProcessPoolExecutor` would add its manager
    and queue threads, and could not terminate a process stuck in a call).
    """

    def __init__(self, name: str, setup: Callable[..., object] | None = None, *args: Any,
                 timeout: float = 120.0) -> None:
        self.name = name
        self.timeout = timeout  # seconds to start, or to answer one call
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=_client_main, args=(child, setup, args),
                                       name=f"bench-{name}", daemon=True)
        self.process.start()
        child.close()
        self._started = False

    def ready(self) -> ClientProcess:
        """Wait until the process has started and run its setup."""
        if not self._started:
            self._answer()
            self._started = True
        return self

    def start(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        self.ready()
        self.pipe.send((fn, args, kwargs))

    def result(self) -> Any:
        return self._answer()

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        self.start(fn, *args, **kwargs)
        return self.result()

    def _answer(self) -> Any:
        try:
            if not self.pipe.poll(self.timeout):
                raise RuntimeError(f"client process {self.name}: no answer in "
                                   f"{self.timeout:.0f} s")
            status, value = self.pipe.recv()
        except EOFError:
            self.process.join(1)
            status, value = "error", f"exited with status {self.process.exitcode}"
        if status != "ok":
            raise RuntimeError(f"client process {self.name}: {value}")
        return value

    def close(self) -> None:
        """End the process (after its call, if one runs, for at most 10 s; then terminated)."""
        with contextlib.suppress(OSError):
            self.pipe.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.pipe.close()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ready_all(clients: Sequence[ClientProcess]) -> list[ClientProcess]:
    """`clients`, spawned together, each awaited until it has started; should one fail, all
    are closed and its error raised."""
    try:
        for c in clients:
            c.ready()
    except BaseException:
        for c in clients:
            c.close()
        raise
    return list(clients)


def gather(clients: Sequence[ClientProcess]) -> list[Any]:
    """The answer of each client's call, all read before an error is raised (the first), so
    that none is left with an answer pending."""
    answers, errors = [], []
    for c in clients:
        try:
            answers.append(c.result())
        except RuntimeError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return answers


# -- TLS -----------------------------------------------------------------------------------

TLS_DIR = DATA / ".tls-bench"  # the bench's CA and server certificate; a dot name is no experiment
TLS_BANNER = re.compile(r"serving .* at (grpc(?:\+tls)?://\S+)")


def tls_certs() -> dict[str, Path]:
    """The bench's CA ("ca") and the server certificate and key ("cert", "key") for localhost,
    127.0.0.1 and ::1, made on first use by `lclstream certs make` and reused afterwards."""
    paths = {"ca": TLS_DIR / "ca.pem", "cert": TLS_DIR / "server.pem",
             "key": TLS_DIR / "server.key"}
    if not all(p.exists() for p in paths.values()):
        from flight_server.security import certs

        made = certs.make(TLS_DIR, tuple(certs.DEFAULT_HOSTS))
        paths = {"ca": made["ca"], "cert": made["server_cert"], "key": made["server_key"]}
    return paths


class TlsServerProcess(ServerProcess):
    """A ServerProcess whose banner may say grpc+tls://; its clients trust the bench's CA
    (`tls_certs`). Plaintext servers work as well, so that both sides of a comparison start
    the same way."""

    banner = TLS_BANNER

    @property
    def tls_root_certs(self) -> str | None:
        """The CA file a client of this server needs (None for plaintext)."""
        return str(tls_certs()["ca"]) if self.location.startswith("grpc+tls") else None

    def flight_client(self) -> flight.FlightClient:
        middleware = [BearerToken(self.token)] if self.token else []
        ca = self.tls_root_certs
        options = {"tls_root_certs": Path(ca).read_bytes()} if ca else {}
        return flight.connect(self.location, middleware=middleware, **options)

    def client(self) -> Client:
        return connect(self.location, self.token, tls_root_certs=self.tls_root_certs)
