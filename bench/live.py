"""Live streams: ingest, fan-out and end-to-end latency of 1 MiB events, against references.

Three measurements, each with its reference measured in the same run:

1. Sustained ingest: `Client.producer(...)` sends N events of 1 MiB (a 512x1024 uint16 frame as
   an `arrow.fixed_shape_tensor`, plus scalars), one event per batch, then `close()`, which
   waits for every acknowledgement (the batch is durable: the server's default fsync policy,
   every `live_fsync_interval`). The reference is the same pyarrow client code path (`do_put`,
   `write_with_metadata` of the same batches with the same producer metadata, acks drained by a
   thread) into the reference server (`bench/reference_server.py --live`), whose DoPut reads
   every batch, keeps nothing (but the last few, for relaying) and acks each batch as soon as it
   is read. For information:
   the Producer into the reference (the Producer's own cost), our server with
   `live_fsync=batch` (an fsync before every ack), and the data disk's speed written with an
   fsync every `live_fsync_interval`: acks wait for the disk, the reference's do not, so ours
   cannot beat it.
2. Fan-out: one producer sends M MiB while 4 subscribers, each in a client process of its own,
   receive the whole stream from "earliest"; aggregate GB/s = 4 x bytes / (last receipt - first
   send). The reference: the first stream ended as a run (`end_run`, timed; should it fail,
   the same events written by `run_writer.write_run`, which it calls, and the failure reported),
   then 4 concurrent DoGets of that run (one stream each) from the same server, started
   together by the same client processes: serving the same bytes from disk (HDF5, page cache).
3. End-to-end latency: a producer sends one 1 MiB event per batch paced at 120 Hz, each carrying
   its send time (`time.monotonic_ns()`, system-wide on one machine); a subscriber in a client
   process of its own, from "latest", takes the time of receipt. p50/p90/p99/max, for our
   server with fsync per interval (the target) and per batch, and for the reference server
   relaying each batch from its DoPut to its DoGets in memory (what Flight and gRPC take for a
   1 MiB hop, twice, on this machine).

Every server runs in its own process, ours over a fresh data directory under `bench-data/`,
removed at the end, with authentication on, as in production. Client processes are
`bench.common.ClientProcess`es running the `task_*` functions below.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

from bench.common import (
    DATA,
    HUGE_PARTITION,
    STATE,
    ClientProcess,
    GiB,
    MiB,
    Result,
    ServerProcess,
    bench_token,
    cpu_seconds,
    fmt_bytes,
    gather,
    gbps,
    kept,
    median,
    percentile,
    print_table,
    ready_all,
    reference_server,
    section,
    verdict_line,
)
from clients import Client, connect
from flight_server.config import Settings
from schemas.live import Ack, ProducerMeta

NAME = "live"
EXPERIMENT = "bench"
TARGET_INGEST = 0.8  # ours / reference, GB/s
TARGET_FANOUT = 0.8  # ours / reference, aggregate GB/s
TARGET_P99 = 0.010  # seconds, end-to-end at 120 Hz
CONSUMERS = 4
RATE_HZ = 120
LATENCY_WARMUP = 60  # events sent before the measured ones: the subscriber connects meanwhile
FRAME = (512, 1024)  # uint16: 1 MiB an event
POOL = 16  # distinct frames, cycled: batches share their buffers, the bench holds 16 MiB
CHILD_TIMEOUT = 120.0  # seconds a client process may take to start or to answer one task


@dataclass(frozen=True)
class Sizes:
    ingest: int  # events (1 MiB each) per ingest
    ingest_reps: int
    fanout: int  # events sent while 4 subscribers receive them
    fanout_reps: int
    latency: int  # measured events at 120 Hz

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(ingest=300, ingest_reps=2, fanout=200, fanout_reps=2, latency=360)
        return cls(ingest=2048, ingest_reps=2, fanout=1024, fanout_reps=2, latency=1200)


# -- events --------------------------------------------------------------------------------

TENSOR = pa.fixed_shape_tensor(pa.uint16(), list(FRAME))
SCHEMA = pa.schema([
    ("timestamp", pa.uint64()),  # the LCLS2 raw time, as a producer at the facility sends it
    ("epix/image", TENSOR),
    ("gmd/energy", pa.float64()),
    ("bench/seq", pa.int64()),
    ("bench/send_ns", pa.int64()),  # time.monotonic_ns() when the batch was made (latency)
])
LCLS2_EPOCH_S = 631152000  # 1990-01-01 in Unix seconds


class Events:
    """One-event batches of the bench schema; the frames come from a pool of random ones."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        frames = rng.integers(0, 4096, size=(POOL, *FRAME), dtype=np.uint16)
        self.frames = [pa.FixedShapeTensorArray.from_numpy_ndarray(frames[i:i + 1])
                       for i in range(POOL)]
        self.t0 = time.time_ns()

    def batch(self, seq: int, send_ns: int = 0) -> pa.RecordBatch:
        ns = self.t0 + seq * 8_333_333 - LCLS2_EPOCH_S * 1_000_000_000
        raw_time = (ns // 1_000_000_000) << 32 | ns % 1_000_000_000
        return pa.RecordBatch.from_arrays([
            pa.array([raw_time], pa.uint64()),
            self.frames[seq % POOL],
            pa.array([1.0 + seq % 100 / 100], pa.float64()),
            pa.array([seq], pa.int64()),
            pa.array([send_ns], pa.int64()),
        ], schema=SCHEMA)

    def batches(self, n: int) -> list[pa.RecordBatch]:
        return [self.batch(i) for i in range(n)]


# -- servers -------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_dir(name: str) -> Iterator[Path]:
    """A new data root under bench-data/ (a dot name: no experiment of the shared root), removed
    afterwards."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=DATA))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class LiveServer(ServerProcess):
    """`lclstream serve` (authentication on) over the fresh data root `data`, with the live
    fsync policy `fsync` (given in its environment: `serve` has no flag for it); runs are one
    DoGet stream (huge partitions), like a subscription."""

    def __init__(self, name: str, data: Path, fsync: str) -> None:
        super().__init__(name, ["-m", "flight_server.cli", "serve", "--data", str(data),
                                "--port", "0", "--state-dir", str(STATE),
                                "--partition-bytes", str(HUGE_PARTITION)], token=bench_token())
        self.data = data
        self.fsync = fsync

    def __enter__(self) -> LiveServer:
        key = "LCLSTREAM_LIVE_FSYNC"
        saved = os.environ.get(key)
        os.environ[key] = self.fsync  # ServerProcess hands this process's environment on
        try:
            super().__enter__()
        finally:
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved
        return self


def configured_interval() -> float:
    """The servers' fsync interval: the environment's, else the setting's default."""
    raw = os.environ.get("LCLSTREAM_LIVE_FSYNC_INTERVAL")
    return float(raw) if raw else Settings().live_fsync_interval


def disk_gbps(directory: Path, nbytes: int, interval: float) -> float:
    """Write `nbytes` in 1 MiB blocks to a file in `directory` while a thread fsyncs it every
    `interval`, then fsync once more, as the live log is written: the ceiling of acknowledged
    (durable) ingest on this disk."""
    block = np.random.default_rng(1).integers(0, 255, MiB, dtype=np.uint8).tobytes()
    path = directory / "disk-check"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.wait(interval):
            os.fsync(fd)

    thread = threading.Thread(target=flusher, daemon=True)
    try:
        t0 = time.perf_counter()
        thread.start()
        for _ in range(nbytes // MiB):
            os.write(fd, block)
        stop.set()
        thread.join()
        os.fsync(fd)
        return gbps(nbytes // MiB * MiB, time.perf_counter() - t0)
    finally:
        stop.set()
        os.close(fd)
        path.unlink(missing_ok=True)


def fsync_interval() -> str:
    source = "from the environment" if os.environ.get("LCLSTREAM_LIVE_FSYNC_INTERVAL") else \
        "default"
    return f"{configured_interval() * 1e3:g} ms ({source})"


# -- client processes ----------------------------------------------------------------------


def _client(location: str, token: str | None) -> Client:
    """In a client process: its client of the server at `location`, connected once."""
    return kept(("client", location), lambda: connect(location, token))


def task_connect(location: str, token: str | None) -> None:
    """Connect ahead of the timed tasks (one call makes the channel)."""
    list(_client(location, token)._flight.list_actions())


def _not_yet(exc: Exception) -> bool:
    """Whether a subscription failed only because the producer has not created the stream yet."""
    return "no live stream" in str(exc) or "has no events yet" in str(exc)


def task_subscribe(location: str, token: str | None, stream: str, events: int,
                   from_: str = "earliest") -> tuple[int, int, int]:
    """Receive `events` events of a live stream: (bytes, events, monotonic ns of the last).
    The stream may not exist yet: the producer starts as the task is sent."""
    client = _client(location, token)
    nbytes = rows = 0
    deadline = time.monotonic() + 30
    while True:
        sub = client.subscribe(EXPERIMENT, stream, from_=from_)
        try:
            for batch in sub:
                nbytes += batch.nbytes
                rows += batch.num_rows
                if rows >= events:
                    break
            return nbytes, rows, time.monotonic_ns()
        except Exception as exc:
            if rows or not _not_yet(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.002)
        finally:
            sub.close()


def task_read_run(location: str, token: str | None, run: int,
                  columns: list[str]) -> tuple[int, int, int]:
    """GetFlightInfo and DoGet of a run, batches counted and dropped: (bytes, events, ns)."""
    client = _client(location, token)
    nbytes = rows = 0
    for batch in client.stream(EXPERIMENT, run, columns):
        nbytes += batch.nbytes
        rows += batch.num_rows
    return nbytes, rows, time.monotonic_ns()


def task_latency(location: str, token: str | None, stream: str, last: int) -> list[int]:
    """Subscribe from "latest" and take each event's receipt time until event `last` is in:
    [seq, ns from send to receipt, ...] of every event received."""
    client = _client(location, token)
    out: list[int] = []
    deadline = time.monotonic() + 30
    while True:
        sub = client.subscribe(EXPERIMENT, stream, from_="latest")
        try:
            for batch in sub:
                now = time.monotonic_ns()
                seqs = batch.column("bench/seq").to_pylist()
                sent = batch.column("bench/send_ns").to_pylist()
                for seq, ns in zip(seqs, sent, strict=True):
                    out += [seq, now - ns]
                if seqs and seqs[-1] >= last:
                    return out
            return out
        except Exception as exc:
            if out or not _not_yet(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.002)
        finally:
            sub.close()


def client_processes(n: int) -> list[ClientProcess]:
    """`n` client processes, spawned at once, then awaited."""
    return ready_all([ClientProcess(f"live-client-{i}", timeout=CHILD_TIMEOUT)
                      for i in range(n)])


def run_all(ws: list[ClientProcess], task: Callable[..., Any], **kwargs: Any) -> list[Any]:
    for w in ws:
        w.start(task, **kwargs)
    return gather(ws)


# -- 1. ingest -----------------------------------------------------------------------------


@dataclass
class Ingest:
    """One way of ingesting the batches; `send` returns whether every batch was acknowledged
    at the right offset. CPU per GiB of the client (this process) and of the server."""

    label: str
    send: Callable[[list[pa.RecordBatch], str], bool]
    server: psutil.Process
    seconds: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    acked: bool = True

    def measure(self, batches: list[pa.RecordBatch], stream: str, me: psutil.Process,
                keep: bool = True) -> None:
        c0, s0 = cpu_seconds(me), cpu_seconds(self.server)
        t0 = time.perf_counter()
        ok = self.send(batches, stream)
        seconds = time.perf_counter() - t0
        if keep:
            self.seconds.append(seconds)
            self.client_cpu.append(cpu_seconds(me) - c0)
            self.server_cpu.append(cpu_seconds(self.server) - s0)
            self.acked &= ok

    def gbps(self, nbytes: int, best: bool = False) -> float:
        return gbps(nbytes, min(self.seconds) if best else median(self.seconds))


def producer_send(client: Client) -> Callable[[list[pa.RecordBatch], str], bool]:
    def send(batches: list[pa.RecordBatch], stream: str) -> bool:
        producer = client.producer(EXPERIMENT, stream)
        for batch in batches:
            producer.send(batch)
        producer.close()
        last = producer.last_ack
        return last is not None and last.offset + last.events == len(batches)

    return send


def raw_send(raw: flight.FlightClient) -> Callable[[list[pa.RecordBatch], str], bool]:
    """The pyarrow calls the Producer makes, without its bookkeeping: DoPut, each batch with its
    producer metadata, acks read by a thread, done_writing, close."""

    def send(batches: list[pa.RecordBatch], stream: str) -> bool:
        descriptor = flight.FlightDescriptor.for_path(EXPERIMENT, "live", stream)
        writer, reader = raw.do_put(descriptor, SCHEMA)
        acks: list[int] = []

        def drain() -> None:
            while (buf := reader.read()) is not None:
                acks.append(Ack.decode(buf.to_pybytes()).offset)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        producer = uuid.uuid4().hex
        for seq, batch in enumerate(batches, 1):
            writer.write_with_metadata(batch, pa.py_buffer(ProducerMeta(producer, seq).encode()))
        writer.done_writing()
        thread.join()
        writer.close()
        return acks == list(range(len(batches)))

    return send


def ingest(sizes: Sizes, events: Events, ours: LiveServer, ours_batch: LiveServer,
           ref: ServerProcess) -> list[Result]:
    n = sizes.ingest
    section(f"live: ingest of {n} events of 1 MiB (one a batch), {fmt_bytes(n * MiB)}, then "
            "close (every ack)")
    batches = events.batches(n)
    nbytes = sum(b.nbytes for b in batches)
    clients = [ours.client(), ours_batch.client(), ref.client()]
    raw = ref.flight_client()
    try:
        main = [
            Ingest("reference: raw do_put loop -> DoPut that discards, acks at once",
                   raw_send(raw), psutil.Process(ref.pid)),
            Ingest("lclstream: Client.producer, fsync interval (default)",
                   producer_send(clients[0]), psutil.Process(ours.pid)),
        ]
        extra = [
            Ingest("Client.producer -> the reference server", producer_send(clients[2]),
                   psutil.Process(ref.pid)),
            Ingest("lclstream: Client.producer, fsync batch", producer_send(clients[1]),
                   psutil.Process(ours_batch.pid)),
        ]
        me = psutil.Process()
        warm = batches[:32]
        for i, c in enumerate(main + extra):  # unmeasured: connections, allocators, files
            c.measure(warm, f"ingest-warm-{i}", me, keep=False)
        for rep in range(sizes.ingest_reps):
            for i, c in enumerate(main):
                c.measure(batches, f"ingest-{i}-{rep}", me)
        for i, c in enumerate(extra):
            c.measure(batches, f"ingest-extra-{i}", me)
    finally:
        for c in (*clients, raw):
            c.close()

    disk = disk_gbps(ours.data, min(nbytes, 512 * MiB), configured_interval())
    ref_c, ours_c, prod_ref, batch_c = main + extra
    reps = f"median of {sizes.ingest_reps}" if sizes.ingest_reps > 1 else "1 repetition"
    print(f"  {fmt_bytes(nbytes)} of Arrow buffers; {reps} (taking turns) for the first two, one "
          f"run of the others; fsync interval {fsync_interval()}; CPU = seconds per GiB")
    print(f"  the data directory's disk: {disk:.2f} GB/s written with an fsync every "
          f"{configured_interval() * 1e3:g} ms, the ceiling of acknowledged ingest; ours "
          f"reaches {ours_c.gbps(nbytes) / disk:.2f} of it")
    rows = []
    for c in main + extra:
        per_gib = GiB / nbytes
        rows.append([c.label, f"{c.gbps(nbytes, best=True):.2f}", f"{c.gbps(nbytes):.2f}",
                     f"{c.gbps(nbytes) / ref_c.gbps(nbytes):.2f}",
                     f"{median(c.client_cpu) * per_gib:.2f}",
                     f"{median(c.server_cpu) * per_gib:.2f}", "yes" if c.acked else "NO"])
    print_table(["contender", "best GB/s", "median GB/s", "/ref", "client CPU", "server CPU",
                 "all acked"], rows, right=(1, 2, 3, 4, 5))

    ratio = ours_c.gbps(nbytes) / ref_c.gbps(nbytes)
    ok = ratio >= TARGET_INGEST and ours_c.acked and ref_c.acked
    verdict_line("ingest ours/reference (median GB/s)", f"{ratio:.2f}", f">= {TARGET_INGEST}", ok)
    batch_ratio = batch_c.gbps(nbytes) / ref_c.gbps(nbytes)
    return [
        Result(NAME, "ingest 1 MiB events, fsync interval (GB/s)",
               f"{ours_c.gbps(nbytes):.2f}/{ref_c.gbps(nbytes):.2f} = {ratio:.2f}",
               f">= {TARGET_INGEST}", ok),
        Result(NAME, "ingest, fsync batch (GB/s, / reference)",
               f"{batch_c.gbps(nbytes):.2f} ({batch_ratio:.2f})"),
        Result(NAME, "ingest, Producer -> reference (GB/s)",
               f"{prod_ref.gbps(nbytes):.2f} ({prod_ref.gbps(nbytes) / ref_c.gbps(nbytes):.2f})"),
        Result(NAME, "disk write + fsync per interval (GB/s)", f"{disk:.2f}"),
    ]


# -- 2. fan-out ----------------------------------------------------------------------------


def _received(ws: list[ClientProcess], events: int) -> tuple[int, int, bool]:
    """Every process's (bytes, events, ns of the last receipt), summed up: (ns of the last
    receipt of all, bytes, whether each received `events`). All are read before any error is
    raised, so that none is left with an answer pending."""
    got = gather(ws)
    return max(r[2] for r in got), sum(r[0] for r in got), all(r[1] == events for r in got)


def reference_run(server: LiveServer, stream: str, batches: list[pa.RecordBatch]
                  ) -> tuple[int, float, str | None]:
    """The stream's events as a run: `end_run`, else (it failed) the same batches written by
    `run_writer.write_run`, as `end_run` would, as run 999. (run, seconds, end_run's error)."""
    client = server.client()
    t = time.perf_counter()
    try:
        return client.end_run(EXPERIMENT, stream)["run"], time.perf_counter() - t, None
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    from flight_server.live.run_writer import write_run

    path = server.data / EXPERIMENT / f"{EXPERIMENT}_Run0999.h5"
    t = time.perf_counter()
    now = time.time_ns()
    write_run(path, SCHEMA, ((b, now + i) for i, b in enumerate(batches)))
    return 999, time.perf_counter() - t, failure


def fanout(sizes: Sizes, events: Events, ours: LiveServer,
           ws: list[ClientProcess]) -> list[Result]:
    n = sizes.fanout
    section(f"live: fan-out, 1 producer and {len(ws)} subscribers (client processes), "
            f"{fmt_bytes(n * MiB)}")
    batches = events.batches(n)
    sent = sum(b.nbytes for b in batches)
    common = {"location": ours.location, "token": ours.token}
    run_all(ws, task_connect, **common)
    proc = psutil.Process(ours.pid)
    client = ours.client()
    live_s: list[float] = []
    ref_s: list[float] = []
    live_cpu: list[float] = []
    ref_cpu: list[float] = []
    producer_s: list[float] = []
    live_ok = ref_ok = True

    def live(stream: str, sent_batches: list[pa.RecordBatch], keep: bool = True) -> None:
        nonlocal live_ok
        s0 = cpu_seconds(proc)
        for w in ws:  # each retries until the producer has created the stream
            w.start(task_subscribe, stream=stream, events=len(sent_batches), **common)
        t0 = time.monotonic_ns()
        producer = client.producer(EXPERIMENT, stream)
        for b in sent_batches:
            producer.send(b)
        producer.close()
        t_sent = time.monotonic_ns()
        t_last, nbytes, ok = _received(ws, len(sent_batches))
        if keep:
            producer_s.append((t_sent - t0) / 1e9)
            live_s.append((t_last - t0) / 1e9)
            live_cpu.append((cpu_seconds(proc) - s0) * GiB / nbytes)
            live_ok &= ok

    def reference(read: dict[str, Any], keep: bool = True) -> None:
        nonlocal ref_ok
        s0 = cpu_seconds(proc)
        for w in ws:
            w.start(task_read_run, **read)
        t0 = time.monotonic_ns()
        t_last, nbytes, ok = _received(ws, n)
        if keep:
            ref_s.append((t_last - t0) / 1e9)
            ref_cpu.append((cpu_seconds(proc) - s0) * GiB / nbytes)
            ref_ok &= ok

    try:
        live("fanout-warm", batches[:8], keep=False)  # the subscribers' first stream
        live("fanout-0", batches)
        run, made_s, failure = reference_run(ours, "fanout-0", batches)
        os.sync()  # the run file's writeback is not to slow down its reads
        read = {"run": run, "columns": SCHEMA.names, **common}
        reference(read, keep=False)  # the run file into the page cache, the catalog's scan
        reference(read)
        for rep in range(1, sizes.fanout_reps):
            live(f"fanout-{rep}", batches)
            reference(read)
    finally:
        client.close()

    live_gbps, ref_gbps = gbps(len(ws) * sent, median(live_s)), gbps(len(ws) * sent,
                                                                       median(ref_s))
    reps = f"median of {sizes.fanout_reps}, taking turns"
    print(f"  {fmt_bytes(sent)} sent, each subscriber receives all of it; {reps}. The producer "
          f"was done (every ack) after {median(producer_s):.2f} s "
          f"({gbps(sent, median(producer_s)):.2f} GB/s)")
    if failure is None:
        print(f"  end_run made the first stream run {run} in {made_s:.2f} s")
    else:
        print(f"  end_run FAILED ({failure}); the reference reads the same events written by "
              f"run_writer.write_run (what end_run does) as run {run}, in {made_s:.2f} s")
    print_table(
        ["contender", "best GB/s", "median GB/s", "/ref", "server CPU/GiB", "all events"],
        [["reference: 4 concurrent DoGets of the run (HDF5)",
          f"{gbps(len(ws) * sent, min(ref_s)):.2f}", f"{ref_gbps:.2f}", "1.00",
          f"{median(ref_cpu):.2f}", "yes" if ref_ok else "NO"],
         ["lclstream: 4 subscribers while the producer sends",
          f"{gbps(len(ws) * sent, min(live_s)):.2f}", f"{live_gbps:.2f}",
          f"{live_gbps / ref_gbps:.2f}", f"{median(live_cpu):.2f}", "yes" if live_ok else "NO"]],
        right=(1, 2, 3, 4))
    ratio = live_gbps / ref_gbps
    ok = ratio >= TARGET_FANOUT and live_ok and ref_ok
    verdict_line("fan-out ours/reference (median aggregate GB/s)", f"{ratio:.2f}",
                 f">= {TARGET_FANOUT}", ok)
    return [
        Result(NAME, f"fan-out to {len(ws)} subscribers (aggregate GB/s)",
               f"{live_gbps:.2f}/{ref_gbps:.2f} = {ratio:.2f}", f">= {TARGET_FANOUT}", ok),
        Result(NAME, f"end_run of a {fmt_bytes(sent)} stream",
               f"{made_s:.2f} s" if failure is None else f"error: {failure.split(':')[0]}",
               "completes", failure is None),
    ]


# -- 3. latency ----------------------------------------------------------------------------


def paced(server: ServerProcess, events: Events, stream: str, worker: ClientProcess,
          total: int) -> list[float]:
    """Send `total` events at RATE_HZ with the Producer while `worker` subscribes from
    "latest"; the send-to-receipt seconds of every event after the warm-up."""
    worker.start(task_latency, location=server.location, token=server.token, stream=stream,
                 last=total - 1)
    client = server.client()
    try:
        producer = client.producer(EXPERIMENT, stream)
        period = 1_000_000_000 // RATE_HZ
        start = time.monotonic_ns()
        for seq in range(total):
            wait = start + seq * period - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            producer.send(events.batch(seq, time.monotonic_ns()))
        producer.close()
        got = worker.result()
    finally:
        client.close()
    pairs = dict(zip(got[::2], got[1::2], strict=True))
    measured = [pairs[s] / 1e9 for s in range(LATENCY_WARMUP, total) if s in pairs]
    if len(measured) != total - LATENCY_WARMUP:
        raise RuntimeError(f"the subscriber received {len(measured)} of the "
                           f"{total - LATENCY_WARMUP} measured events")
    return measured


def latency(sizes: Sizes, events: Events, ours: ServerProcess, ours_batch: ServerProcess,
            ref: ServerProcess, worker: ClientProcess) -> list[Result]:
    total = sizes.latency + LATENCY_WARMUP
    section(f"live: end-to-end latency, 1 MiB events at {RATE_HZ} Hz, {sizes.latency} events "
            f"(after {LATENCY_WARMUP})")
    for server in (ours, ours_batch, ref):
        worker.call(task_connect, location=server.location, token=server.token)
    cases = [
        ("lclstream, fsync interval (default)", ours),
        ("lclstream, fsync batch", ours_batch),
        ("reference: in-memory relay DoPut -> DoGet", ref),
    ]
    samples = {label: paced(server, events, f"latency-{i}", worker, total)
               for i, (label, server) in enumerate(cases)}
    rows = []
    for label, xs in samples.items():
        rows.append([label, *(f"{percentile(xs, q) * 1e3:.2f}" for q in (50, 90, 99)),
                     f"{max(xs) * 1e3:.2f}"])
    print("  send (Producer.send) to receipt (Subscription iteration), ms; subscriber in a client "
          "process of its own")
    print_table(["case", "p50", "p90", "p99", "max"], rows, right=(1, 2, 3, 4))
    print("  the 6 slowest events (event number: ms), to tell periodic stalls from noise:")
    for label, xs in samples.items():
        worst = sorted(sorted(range(len(xs)), key=xs.__getitem__)[-6:])
        print(f"    {label.split(':')[0]:<36} "
              + ", ".join(f"{i + LATENCY_WARMUP}: {xs[i] * 1e3:.1f}" for i in worst))
    ours_xs = samples[cases[0][0]]
    p99 = percentile(ours_xs, 99)
    ok = p99 < TARGET_P99
    verdict_line("p99 send to receipt, fsync interval", f"{p99 * 1e3:.2f} ms",
                 f"< {TARGET_P99 * 1e3:.0f} ms", ok)
    results = [Result(NAME, f"latency at {RATE_HZ} Hz, p99 (p50, max)",
                      f"{p99 * 1e3:.2f} ms ({percentile(ours_xs, 50) * 1e3:.2f}, "
                      f"{max(ours_xs) * 1e3:.2f})", f"< {TARGET_P99 * 1e3:.0f} ms", ok)]
    for label, _ in cases[1:]:
        xs = samples[label]
        results.append(Result(NAME, f"latency p99, {label.split(':')[0]}",
                              f"{percentile(xs, 99) * 1e3:.2f} ms"))
    return results


# -- the benchmark -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Result]:
    sizes = Sizes.of(args.quick)
    events = Events()
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(LiveServer(
            "lclstream-live", stack.enter_context(fresh_dir("live")), "interval"))
        ours_batch = stack.enter_context(LiveServer(
            "lclstream-live-batch", stack.enter_context(fresh_dir("live-batch")), "batch"))
        ref = stack.enter_context(reference_server(live=True, name="live-reference"))
        ws: list[ClientProcess] = []
        stack.callback(lambda: [w.close() for w in ws])
        ws += client_processes(CONSUMERS)
        parts: list[tuple[str, Callable[[], list[Result]]]] = [
            ("ingest", lambda: ingest(sizes, events, ours, ours_batch, ref)),
            ("fan-out", lambda: fanout(sizes, events, ours, ws)),
            ("latency", lambda: latency(sizes, events, ours, ours_batch, ref, ws[0])),
        ]
        for label, part in parts:
            try:
                os.sync()  # the last part's writeback is not to land in this one's figures
                results += part()
            except Exception as exc:  # one broken part must not hide the others' figures
                print(f"  live {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                results.append(Result(NAME, label, f"error: {type(exc).__name__}", "completes",
                                      False))
                # a client process may still wait on a stream that will never end: new ones
                for w in ws:
                    w.close()
                ws[:] = client_processes(CONSUMERS)
    return results
