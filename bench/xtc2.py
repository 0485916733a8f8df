"""Raw LCLS-II runs (xtc2) served through psana: a run's frames read whole, and time to first batch.

`--only xtc2`, against psana itself measured in the same run:

1. **Throughput**: the pnccd frames of an xtc2 run (1 MiB uint16 frames, 512x1024, about
   `--size` of them; written once by the project's generator under
   `bench-data/bench_xtc2/xtc/`), column `pnccd/raw/calib`, fetched by GetFlightInfo + DoGet of
   all its endpoints (`Client.read`) from a server process, against psana's own event loop in
   one process: `DataSource(exp=, run=, dir=)` (`PS_PARALLEL=none`), `run.events()`, and
   `run.Detector("pnccd").raw.calib(evt)` copied into numpy, the floor any psana consumer pays
   for the same values. Events/s and GB/s of frames, median of `--reps`, taking turns; target
   ours / psana >= 0.8.
2. **Time to first batch**: GetFlightInfo + DoGet of the same column to the first RecordBatch
   in hand (then cancelled), p50 over `--requests` requests on a server that has described the
   run (target < 200 ms); and, informational, the first request to a fresh server process,
   which imports psana and describes the run first.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

from bench.common import (
    DATA,
    HUGE_PARTITION,
    ROOT,
    ClientProcess,
    Contender,
    GiB,
    Result,
    ServerProcess,
    fmt_bytes,
    kept,
    median,
    ms,
    our_server,
    percentile,
    print_table,
    ready_all,
    section,
    verdict_line,
    warm_cache,
)
from bench.reference_server import columns_ticket

NAME = "xtc2"
XTC2_EXPERIMENT = "bench_xtc2"
FRAME_SHAPE = (512, 1024)  # uint16: 1 MiB a frame
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1] * 2
DETECTOR = "pnccd"
CALIB = f"{DETECTOR}/raw/calib"  # run.Detector("pnccd").raw.calib(evt)
STREAMS = 3  # the generator's: s000 pnccd + hexanode, s001 gmd, s002 EPICS
PARALLEL = 4  # Client.read's endpoints in flight (its default)
COPY_FRAMES = 4  # the reference copies each frame into a block of this many (4 MiB, a batch)
TARGET_RATIO = 0.8  # ours / psana, events/s (= GB/s: the same frames)
TARGET_TTFB = 0.2  # seconds, p50 of GetFlightInfo + DoGet to the first batch, run described
WARMUP = 3  # first-batch requests not counted
GAP = 0.05  # idle after each first-batch request, so the next meets a server wound down


@dataclass(frozen=True)
class XtcRun:
    experiment: str
    number: int  # the run: its size in MiB of frame slots (events x 1 MiB)
    xtc_dir: Path
    events: int

    def stream_file(self, stream: int) -> Path:
        from flight_server.generator.xtc2 import run_files

        return run_files(self.xtc_dir, self.experiment, self.number, stream)

    def files(self) -> list[Path]:
        from flight_server.generator.xtc2 import smd_file

        return [*(self.stream_file(s) for s in range(STREAMS)),
                *(smd_file(self.xtc_dir, self.experiment, self.number, s)
                  for s in range(STREAMS))]


def xtc2_run(size: int) -> XtcRun:
    """The run of about `size` bytes of frames (one event a MiB; the pnccd misses about 5 % of
    them), written on first use in `bench-data/bench_xtc2/xtc/`, its number its events, so runs
    of several sizes sit side by side. The generator writes every file atomically, the smalldata
    file of the last stream last: a run that has it is complete."""
    from flight_server.generator.xtc2 import generate_xtc2_run, smd_file

    events = max(1, size // FRAME_BYTES)
    xtc_dir = DATA / XTC2_EXPERIMENT / "xtc"
    if not smd_file(xtc_dir, XTC2_EXPERIMENT, events, STREAMS - 1).exists():
        print(f"  generating an xtc2 run of {events} events, {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} "
              f"uint16 pnccd frames, in {xtc_dir.relative_to(ROOT)} ...", flush=True)
        generate_xtc2_run(xtc_dir, XTC2_EXPERIMENT, events, n_events=events,
                          frame_shape=FRAME_SHAPE)
    return XtcRun(XTC2_EXPERIMENT, events, xtc_dir, events)


def fingerprint(frame: np.ndarray) -> int:
    """A few pixels of a frame summed: enough to tell two readers handed out the same frames,
    cheap enough to leave in the reference's loop (128 of 512 Ki pixels)."""
    return int(frame[::64, ::64].sum(dtype=np.int64))


def table_fingerprint(table: pa.Table) -> tuple[int, int]:
    """(frames present, sum of their fingerprints) of the column in a table of ours."""
    column = table.column(CALIB)
    total = 0
    for chunk in column.chunks:
        frames = np.asarray(chunk.storage.flatten()).reshape(-1, *FRAME_SHAPE)  # nulls left out
        total += int(frames[:, ::64, ::64].sum(dtype=np.int64))
    return len(column) - column.null_count, total


# -- the reference: psana's event loop, in a process of its own ----------------------------


def psana_setup() -> None:
    """Run first in the reference's process: psana imported (not timed: a process pays it
    once, as our server does at its first xtc2 request), serial."""
    os.environ["PS_PARALLEL"] = "none"  # psana picks MPI unless told otherwise
    from psana import DataSource  # noqa: F401
    from psana.psexp.ds_base import DataSourceBase

    # exp=/run=/dir= first asks the LCLS logbook web service for the run's file list; it cannot
    # be reached from here and raises. {} is psana's own answer when the logbook has no list
    # (offline): it then finds the stream files in `dir`, as it does at the facility.
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}


def psana_read(experiment: str, number: int, xtc_dir: str) -> dict[str, Any]:
    """psana's event loop over the run: every frame of `pnccd.raw.calib` (a view of the
    datagram psana read) copied into a block of COPY_FRAMES frames, reused, as a consumer
    puts frames into its own memory; events the pnccd missed are skipped, as the server makes
    them null. Timed from the DataSource on; the set-up (DataSource, run, Detector) apart."""
    from psana import DataSource

    t0 = time.perf_counter()
    ds = DataSource(exp=experiment, run=number, dir=xtc_dir, skip_calib_load="all")
    run = next(ds.runs())
    det = run.Detector(DETECTOR)
    t1 = time.perf_counter()
    events = frames = total = 0
    block: np.ndarray | None = None
    for evt in run.events():
        events += 1
        if det.raw._segments(evt) is None:  # missed: its calib() would index None
            continue
        frame = det.raw.calib(evt)
        if block is None:
            block = np.empty((COPY_FRAMES, *frame.shape), frame.dtype)
        out = block[frames % COPY_FRAMES]
        np.copyto(out, frame)
        total += fingerprint(out)
        frames += 1
    t2 = time.perf_counter()
    return {"setup": t1 - t0, "loop": t2 - t1, "events": events, "frames": frames,
            "fingerprint": total}


# -- the clients, each in a process of its own ------------------------------------------------


def client_setup(location: str, token: str | None) -> None:
    from clients import connect

    kept("client", lambda: connect(location, token))


def client_read(experiment: str, number: int, column: str, parallel: int) -> int:
    """Our client's `read` of one column of the run (GetFlightInfo, then DoGet of every
    endpoint, `parallel` at a time) into a Table; its events."""
    return kept("client").read(experiment, number, [column], parallel=parallel).num_rows


def flight_setup(location: str) -> None:
    kept("flight", lambda: flight.connect(location))


def flight_read(column: str) -> int:
    """GetFlightInfo + DoGet of the in-memory server's one endpoint, read whole."""
    client = kept("flight")
    info = client.get_flight_info(flight.FlightDescriptor.for_command(columns_ticket([column])))
    return client.do_get(info.endpoints[0].ticket).read_all().num_rows


# -- our read path without the network, in a process of its own -----------------------------


class ReadPath:
    """The server's read path for one DoGet stream (the xtc2 source's batches, read ahead on
    a pool of the server's `read_threads`), no gRPC: what the source alone delivers."""

    def __init__(self, first_file: str, experiment: str, number: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from flight_server.config import Settings
        from flight_server.sources import describe
        from flight_server.sources.xtc2 import psana

        settings = Settings()
        path = Path(first_file)
        t0 = time.perf_counter()
        psana()  # the modules the source uses, imported as at a server's first xtc2 request
        t1 = time.perf_counter()
        self.run = describe(path, experiment, number, "xtc2", path.parent.parent)
        self.timings = {"import": t1 - t0, "describe": time.perf_counter() - t1}
        self.pool = ThreadPoolExecutor(settings.read_threads, thread_name_prefix="read")

    def read(self) -> int:
        from flight_server.sources.streaming import BatchSizing, stream_batches

        columns = self.run.resolve([CALIB])
        return sum(b.num_rows for b, _ in stream_batches(
            self.run, columns, 0, self.run.num_events, 1, BatchSizing(), self.pool))

    def close(self) -> None:
        self.pool.shutdown()
        self.run.retire()


_read_path: list[ReadPath] = []


def read_path_setup(first_file: str, experiment: str, number: int) -> None:
    os.environ["PS_PARALLEL"] = "none"
    _read_path.append(ReadPath(first_file, experiment, number))


def read_path_read() -> int:
    return _read_path[0].read()


def read_path_timings() -> dict[str, float]:
    """Seconds its set-up took to import psana's modules, and to describe the run."""
    return _read_path[0].timings


# -- time to first batch ---------------------------------------------------------------------


@dataclass
class FirstBatch:
    plan: float  # GetFlightInfo
    total: float  # GetFlightInfo + DoGet to the first batch in hand
    rows: int
    nbytes: int


def first_batch(client, raw, xr: XtcRun) -> FirstBatch:
    """GetFlightInfo of the frame column, DoGet of the first endpoint, the first batch read,
    the stream cancelled."""
    t0 = time.perf_counter()
    info = client.plan(xr.experiment, xr.number, [CALIB])
    t1 = time.perf_counter()
    reader = raw.do_get(info.endpoints[0].ticket)
    batch = reader.read_chunk().data
    t2 = time.perf_counter()
    reader.cancel()
    return FirstBatch(t1 - t0, t2 - t0, batch.num_rows, batch.nbytes)


def cold_request(xr: XtcRun) -> tuple[FirstBatch, FirstBatch, float]:
    """A fresh server: its start-up (returned, not counted), a `whoami` (connected, the token
    checked), then the first request for the run (psana imported, the run described), and a
    second (warm)."""
    t0 = time.perf_counter()
    with our_server("lclstream-xtc2-cold") as server, server.client() as client:
        started = time.perf_counter() - t0
        raw = server.flight_client()
        try:
            client.whoami()
            list(raw.list_actions())
            cold = first_batch(client, raw, xr)
            time.sleep(GAP)
            warm = first_batch(client, raw, xr)
        finally:
            raw.close()
    return cold, warm, started


# The in-memory Flight server: bench/reference_server.py's, holding the frame column of the run
# as the very batches our server sends (read by the xtc2 source at its start), streamed by
# RecordBatchStream in C++: Arrow Flight's own ceiling on this machine for these batches.
IN_MEMORY_SERVER = """
import sys
from pathlib import Path
import pyarrow as pa
from bench.reference_server import HeldRun, ReferenceServer
from flight_server.config import Settings
from flight_server.sources import describe
from flight_server.sources.streaming import BatchSizing, batch_ranges
first, experiment, number, column = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
settings = Settings()
sizing = BatchSizing(settings.batch_bytes, settings.first_batch_bytes, settings.prefetch)
run = describe(first, experiment, number, "xtc2", first.parent.parent)
columns = run.resolve([column])
with run.reader() as reader:
    batches = [reader.read(columns, lo, hi)
               for lo, hi in batch_ranges(columns, 0, run.num_events, 1, sizing)]
table = pa.Table.from_batches(batches, schema=run.schema(columns))
server = ReferenceServer(f"grpc://{settings.host}:0", HeldRun(run, table, sizing))
print(f"serving {column} of run {number} (in memory) at grpc://{settings.host}:{server.port}",
      flush=True)
server.serve()
"""


def in_memory_server(xr: XtcRun) -> ServerProcess:
    return ServerProcess("reference-xtc2", ["-c", IN_MEMORY_SERVER, str(xr.stream_file(0)),
                                            xr.experiment, str(xr.number), CALIB], timeout=300)


# -- the benchmark ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Result]:
    xr = xtc2_run(args.size)
    section(f"xtc2: the pnccd frames of a raw LCLS-II run, {xr.events} events of "
            f"{FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16, through psana")
    files = xr.files()
    for path in files:
        warm_cache(path)
    on_disk = sum(p.stat().st_size for p in files)
    print(f"  {xr.xtc_dir.relative_to(ROOT)}/{xr.experiment}-r{xr.number:04d}-s00[0-2]-c000.xtc2 "
          f"+ smalldata: {fmt_bytes(on_disk)}; page cache warmed; column {CALIB}", flush=True)

    with (
        our_server("lclstream-xtc2") as multi,
        our_server("lclstream-xtc2-1-endpoint", partition_bytes=HUGE_PARTITION) as single,
        in_memory_server(xr) as ref,
        multi.client() as multi_client,
    ):
        procs = ready_all([
            ClientProcess("xtc2-client", client_setup, multi.location, multi.token),
            ClientProcess("xtc2-client-1-endpoint", client_setup, single.location, single.token),
            ClientProcess("psana", psana_setup),
            ClientProcess("xtc2-read-path", read_path_setup, str(xr.stream_file(0)),
                          xr.experiment, xr.number, timeout=300),
            ClientProcess("xtc2-in-memory-client", flight_setup, ref.location),
        ])
        multi_proc, single_proc, ref_proc, path_proc, memory_proc = procs
        try:
            timings = path_proc.call(read_path_timings)
            info = multi_client.plan(xr.experiment, xr.number, [CALIB])
            endpoints = len(info.endpoints)
            table = multi_client.read(xr.experiment, xr.number, [CALIB])  # unmeasured: checked
            ours_frames, ours_print = table_fingerprint(table)
            events = table.num_rows
            del table
            nbytes = ours_frames * FRAME_BYTES  # GB/s of the frames present, for everyone
            last: dict[str, Any] = {}

            def rows_of(proc: ClientProcess, fn, *fn_args: Any) -> Callable[[], int]:
                def fetch() -> int:
                    rows = proc.call(fn, *fn_args)
                    if rows != events:
                        raise RuntimeError(f"{proc.name}: {rows} events, expected {events}")
                    return nbytes
                return fetch

            def reference() -> int:
                answer = ref_proc.call(psana_read, xr.experiment, xr.number, str(xr.xtc_dir))
                last.update(answer)
                if answer["events"] != events or answer["frames"] != ours_frames:
                    raise RuntimeError(f"psana read {answer['events']} events and "
                                       f"{answer['frames']} frames; ours {events} and "
                                       f"{ours_frames}")
                return nbytes

            def pid(proc: ClientProcess) -> list[psutil.Process]:
                return [psutil.Process(proc.process.pid)]

            read_args = (xr.experiment, xr.number, CALIB)
            contenders = [
                Contender(f"lclstream: Client.read, {endpoints} endpoint"
                          f"{'s' if endpoints > 1 else ''}, parallel={PARALLEL}",
                          rows_of(multi_proc, client_read, *read_args, PARALLEL),
                          psutil.Process(multi.pid), pid(multi_proc)),
                Contender("lclstream: 1 endpoint (partition_bytes huge), 1 DoGet",
                          rows_of(single_proc, client_read, *read_args, 1),
                          psutil.Process(single.pid), pid(single_proc)),
                Contender("reference: psana event loop, raw.calib copied into numpy",
                          reference, clients=pid(ref_proc)),
                Contender("our read path in-process (xtc2 source, no network)",
                          rows_of(path_proc, read_path_read), clients=pid(path_proc)),
                Contender("in-memory Flight server, the same batches read at its start, "
                          "1 DoGet", rows_of(memory_proc, flight_read, CALIB),
                          psutil.Process(ref.pid), pid(memory_proc)),
            ]
            me = psutil.Process()
            setups, loops = [], []
            for rep in range(args.reps + 1):  # round 0 warms up and is not counted
                for c in contenders:
                    c.measure(me)
                    if rep == 0:
                        c.reset()
                if rep:
                    setups.append(last["setup"])
                    loops.append(last["loop"])
            same = (last["frames"], last["fingerprint"]) == (ours_frames, ours_print)
        finally:
            for proc in procs:
                proc.close()

        # time to first batch, on the server that has described the run (it has served it)
        raw = multi.flight_client()
        try:
            requests = []
            for i in range(WARMUP + args.requests):
                fb = first_batch(multi_client, raw, xr)
                time.sleep(GAP)
                if i >= WARMUP:
                    requests.append(fb)
        finally:
            raw.close()

    ours_c, single_c, ref_c, path_c, memory_c = contenders
    print(f"  {args.reps} rounds, taking turns, after one unmeasured; {events} events, "
          f"{ours_frames} frames present ({fmt_bytes(nbytes)}); GB/s = 1e9 bytes/s of frames; "
          f"CPU = median CPU seconds per GiB of frames, of the reading process (every "
          f"contender reads in a client process of its own) and of the server")
    rows = []
    for c in contenders:
        per_gib = GiB / c.nbytes
        rows.append([c.label, f"{events / median(c.seconds):,.0f}", f"{c.best():.2f}",
                     f"{c.median():.2f}", f"{c.median() / ref_c.median():.2f}",
                     f"{median(c.client_cpu) * per_gib:.2f}",
                     f"{median(c.server_cpu) * per_gib:.2f}" if c.server else "-"])
    print_table(["contender", "median events/s", "best GB/s", "median GB/s", "/psana median",
                 "client CPU", "server CPU"], rows, right=(1, 2, 3, 4, 5, 6))
    print(f"  psana: DataSource + run + Detector {ms(median(setups))}, event loop "
          f"{ms(median(loops))} (medians; both timed)")
    print(f"  the frames are psana's (frames present and a fingerprint of each): {same}")

    ratio = ours_c.median() / ref_c.median()
    ok = ratio >= TARGET_RATIO and same
    verdict_line("ours/psana, Client.read (median events/s)", f"{ratio:.2f}",
                 f">= {TARGET_RATIO}", ok)
    # one DoGet stream: the rate of the Flight stream itself, without parallel endpoints that
    # make server and client compete for this machine's two cores
    single = single_c.median() / ref_c.median()
    ok_single = single >= TARGET_RATIO and same
    verdict_line("ours/psana, 1 DoGet (median events/s)", f"{single:.2f}", f">= {TARGET_RATIO}",
                 ok_single)

    cold, second, started = cold_request(xr)
    totals = [r.total for r in requests]
    print(f"\n  time to first batch of {CALIB}: GetFlightInfo + DoGet to the first batch in "
          f"hand, then cancelled; {args.requests} requests after {WARMUP} unmeasured, each "
          f"followed by {GAP * 1e3:.0f} ms idle")
    print_table(["case", "p50", "p95", "min", "max", "first batch"], [
        ["run described (warm server)", ms(percentile(totals, 50)), ms(percentile(totals, 95)),
         ms(min(totals)), ms(max(totals)), f"{requests[0].rows} ev, "
         f"{fmt_bytes(requests[0].nbytes)}"],
        ["  of which GetFlightInfo", *(ms(percentile([r.plan for r in requests], q))
                                       for q in (50, 95)),
         ms(min(r.plan for r in requests)), ms(max(r.plan for r in requests)), ""],
    ], right=(1, 2, 3, 4))
    print(f"  cold, the first request to a fresh server (start-up {started:.2f} s, not "
          f"counted): {ms(cold.total)}, of which GetFlightInfo (psana imported, the run "
          f"described) {ms(cold.plan)}; its second request {ms(second.total)}")
    print(f"  in a process of its own with the server's modules loaded: importing psana's "
          f"modules {ms(timings['import'])}, describing the run {ms(timings['describe'])}")
    p50 = percentile(totals, 50)
    ok_ttfb = p50 < TARGET_TTFB
    verdict_line("GetFlightInfo + first batch, p50", ms(p50), f"< {ms(TARGET_TTFB)}", ok_ttfb)

    return [
        Result(NAME, "ours/psana, Client.read (median events/s)",
               f"{events / median(ours_c.seconds):,.0f}/{events / median(ref_c.seconds):,.0f} "
               f"= {ratio:.2f}", f">= {TARGET_RATIO}", ok),
        Result(NAME, "ours/psana, Client.read (median GB/s)",
               f"{ours_c.median():.2f}/{ref_c.median():.2f}"),
        Result(NAME, "ours/psana, 1 DoGet (median GB/s)",
               f"{single_c.median():.2f}/{ref_c.median():.2f} = {single:.2f}",
               f">= {TARGET_RATIO}", ok_single),
        Result(NAME, "ours / in-memory Flight server (median GB/s)",
               f"{ours_c.median():.2f}/{memory_c.median():.2f} = "
               f"{ours_c.median() / memory_c.median():.2f}"),
        Result(NAME, "our read path, no network / psana (median GB/s)",
               f"{path_c.median():.2f}/{ref_c.median():.2f} = "
               f"{path_c.median() / ref_c.median():.2f}"),
        Result(NAME, "GetFlightInfo + first batch, described (p50/p95)",
               f"{ms(p50)} / {ms(percentile(totals, 95))}", f"< {ms(TARGET_TTFB)}", ok_ttfb),
        Result(NAME, "cold: first request to a fresh server", f"{ms(cold.total)}"),
    ]

