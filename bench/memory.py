"""Server memory while streaming a run far larger than its memory budget.

The server promises memory bounded by a few batches per stream whatever the run size, so its
resident set is sampled every ~20 ms while a client streams a big run and discards every
batch (the client holds one batch at a time, as `Client.stream` users do). Two concurrent
streams show what each additional stream costs; a last single stream shows whether memory kept
after a stream keeps growing.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass

import psutil

from bench.common import (
    BenchRun,
    MiB,
    Result,
    ServerProcess,
    bench_run,
    fmt_bytes,
    gbps,
    our_server,
    print_table,
    section,
    verdict_line,
    warm_cache,
)

NAME = "memory"
TARGET_PEAK = 512 * MiB
INTERVAL = 0.02


class RssSampler:
    """Peak resident set of a process, sampled in a background thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            self._stop.wait(INTERVAL)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass(frozen=True)
class Stream:
    streams: int
    before: int
    peak: int
    after: int
    nbytes: int
    seconds: float
    samples: int


def stream_all(server: ServerProcess, run: BenchRun, streams: int) -> Stream:
    """`streams` clients each read the whole run at once, batch by batch, keeping nothing."""
    received = [0] * streams
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            with server.client() as client:
                for batch in client.stream(run.experiment, run.number):
                    received[i] += batch.nbytes
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(streams)]
    sampler = RssSampler(server.pid)
    before = sampler.rss()
    t0 = time.perf_counter()
    with sampler:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    time.sleep(0.2)  # let the server finish tearing the streams down
    return Stream(streams, before, sampler.peak, sampler.rss(), sum(received), seconds,
                  sampler.samples)


def run(args: argparse.Namespace) -> list[Result]:
    section(f"memory: server RSS while streaming a {fmt_bytes(args.big_size)} run")
    br = bench_run(args.big_size)
    warm_cache(br.path)

    with our_server("lclstream-memory") as server:
        with server.client() as client:
            info = client.plan(br.experiment, br.number)  # the run is described (and cached)
        print(f"  {br.path.name}: {fmt_bytes(info.total_bytes)} in {len(info.endpoints)} "
              f"endpoints, read one after the other by each stream; RSS sampled every "
              f"{INTERVAL * 1e3:.0f} ms")
        # One stream again at the end: if RSS after it is no higher than after the first, what
        # the server keeps between streams is allocator reserve, not a leak.
        runs = [stream_all(server, br, n) for n in (1, 2, 1)]

    labels = ["1 stream", "2 streams", "1 stream, again"]
    rows = [[label, fmt_bytes(s.before), fmt_bytes(s.peak), fmt_bytes(s.peak - s.before),
             fmt_bytes(s.after), fmt_bytes(s.nbytes), f"{gbps(s.nbytes, s.seconds):.2f}",
             s.samples] for label, s in zip(labels, runs, strict=True)]
    print_table(["streams", "RSS before", "peak RSS", "peak - before", "RSS after", "streamed",
                 "GB/s", "samples"], rows, right=(1, 2, 3, 4, 5, 6, 7))

    results = []
    for label, s in zip(labels, runs, strict=True):
        ok = s.peak < TARGET_PEAK and s.nbytes >= info.total_bytes * s.streams * 0.99
        verdict_line(f"peak server RSS, {label}", fmt_bytes(s.peak),
                     f"< {fmt_bytes(TARGET_PEAK)}", ok)
        results.append(Result(NAME, f"peak server RSS, {label} (before: {fmt_bytes(s.before)})",
                              fmt_bytes(s.peak), f"< {fmt_bytes(TARGET_PEAK)}", ok))
    return results
