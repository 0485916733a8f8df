"""Other facilities' formats: an NXmx series read whole, and a European XFEL run's first batch.

Two benchmarks, each against the facility's own reader measured in the same run:

1. **nxmx** (`--only nxmx`): the frame column `entry/data/data` of a DECTRIS Eiger series
   (1024x1024 uint16 frames, bitshuffle-LZ4, 100 frames a data file, written once by the
   project's generator) fetched by GetFlightInfo + DoGet of all its endpoints
   (`Client.read`, endpoints in parallel), against h5py + hdf5plugin reading the same frames in
   one local process, as a user script does: the master opened, `/entry/data/data_000001 ...`
   read through their external links a few frames at a time. GB/s of decompressed frame bytes,
   the contenders taking turns; target ours / h5py >= 1.5 (the server decompresses on every
   core; one h5py process decompresses on one). Beside them, for what explains the figure: our
   server with one endpoint (one DoGet stream), h5py in 2 threads and in 2 processes, and
   `bench/reference_server.py` holding the same frames decompressed in memory (Arrow Flight's
   own ceiling on this machine: no reading, no decompression).
2. **euxfel** (`--only euxfel`): a European XFEL run of 100 sequence files (16 AGIPD modules
   and 4 other aggregators, 5 sequences, written once by extra-data's own mock writer): from a
   request for the run that the server has not described yet (a fresh server process each
   repetition, its start-up not counted) to the first RecordBatch of an XGM CONTROL column in
   hand; p50 over the repetitions, target < 1 s. Beside it, `extra_data.RunDirectory` opening
   the same run and reading the first train of the same key, in a fresh process each
   repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter with HDF5 for the reference)
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

from bench.common import (
    DATA,
    HUGE_PARTITION,
    ROOT,
    STATE,
    ClientProcess,
    Contender,
    GiB,
    MiB,
    Result,
    ServerProcess,
    bench_token,
    fmt_bytes,
    gather,
    median,
    our_server,
    percentile,
    print_table,
    ready_all,
    section,
    verdict_line,
    warm_cache,
)
from bench.reference_server import columns_ticket
from flight_server.sources import describe
from flight_server.sources.streaming import BatchSizing, stream_batches

NXMX = "nxmx"
EUXFEL = "euxfel"

# -- NXmx ----------------------------------------------------------------------------------

NXMX_EXPERIMENT = "bench_nxmx"
SAMPLE = "lysozyme"
FRAME_SHAPE = (1024, 1024)  # uint16: 2 MiB a frame, an Eiger2 1M's size
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1] * 2
FRAMES_PER_FILE = 100
FRAMES = "entry/data/data"  # the frame column: the data files' dataset path
BLOCK_FRAMES = 4  # frames the reference reads at a time (8 MiB; the server's batches are 4 MiB)
PARALLEL = 4  # Client.read's endpoints in flight (its default)
TARGET_NXMX = 1.5  # ours / h5py, GB/s of decompressed frames


@dataclass(frozen=True)
class Series:
    experiment: str
    number: int  # the run: <sample>_<number>_master.h5
    master: Path
    frames: int

    @property
    def nbytes(self) -> int:
        return self.frames * FRAME_BYTES

    def data_files(self) -> list[Path]:
        return sorted(self.master.parent.glob(f"{SAMPLE}_{self.number}_data_*.h5"))


def nxmx_series(size: int) -> Series:
    """The series of about `size` bytes of decompressed frames, written on first use in
    `bench-data/bench_nxmx/`; its number (the run) is its size in MiB, so series of several
    sizes sit side by side. The generator writes the master last, so one that exists is
    complete."""
    from flight_server.generator.nxmx import generate_nxmx_series

    frames = max(1, size // FRAME_BYTES)
    number = frames * FRAME_BYTES // MiB
    directory = DATA / NXMX_EXPERIMENT
    master = directory / f"{SAMPLE}_{number}_master.h5"
    if not master.exists():
        print(f"  generating {frames} frames of {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16, "
              f"bitshuffle-LZ4, {master.relative_to(ROOT)} ...", flush=True)
        generate_nxmx_series(directory, number, n_frames=frames,
                             frames_per_file=FRAMES_PER_FILE, frame_shape=FRAME_SHAPE,
                             compression="bslz4")
    return Series(NXMX_EXPERIMENT, number, master, frames)


def stored_bytes(series: Series) -> int:
    """The bytes of the stored (compressed) frame chunks, from HDF5's chunk index."""
    sizes: list[int] = []
    for path in series.data_files():
        with h5py.File(path, "r", locking=False) as f:
            f[FRAMES].id.chunk_iter(lambda info: sizes.append(info.size))
    return sum(sizes)


def h5py_blocks(master: Path) -> list[tuple[str, int, int]]:
    """(link, first, stop) of each block of BLOCK_FRAMES frames, data file by data file in
    image-number order (the order of the master's links)."""
    blocks = []
    with h5py.File(master, "r", locking=False) as f:
        data = f["entry/data"]
        for name in sorted(n for n in data if n.startswith("data_")):
            count = data[name].shape[0]
            blocks += [(name, i, min(i + BLOCK_FRAMES, count))
                       for i in range(0, count, BLOCK_FRAMES)]
    return blocks


def h5py_read(master: str, blocks: list[tuple[str, int, int]]) -> int:
    """The reference: the master opened, each linked dataset opened once through its external
    link and read a block at a time into a new array (kept only until the next block), as a
    user script does; the bytes read. Module-level, so a client process can run it too."""
    nbytes = 0
    with h5py.File(master, "r", locking=False) as f:
        data = f["entry/data"]
        datasets: dict[str, h5py.Dataset] = {}
        for name, first, stop in blocks:
            ds = datasets.get(name)
            if ds is None:
                ds = datasets[name] = data[name]
            nbytes += ds[first:stop].nbytes
    return nbytes


def frames_equal(table: pa.Table, series: Series) -> bool:
    """Whether the table's frames are h5py's, frame for frame (checked once, unmeasured)."""
    column = table.column(FRAMES)
    if table.num_rows != series.frames:
        return False
    ours = np.concatenate([np.asarray(chunk.storage.flatten()) for chunk in column.chunks])
    k = 0
    with h5py.File(series.master, "r", locking=False) as f:
        for name, first, stop in h5py_blocks(series.master):
            block = f["entry/data"][name][first:stop].reshape(-1)
            if not np.array_equal(ours[k : k + block.size], block):
                return False
            k += block.size
    return k == ours.size


def run_nxmx(args: argparse.Namespace) -> list[Result]:
    series = nxmx_series(args.size)
    section(f"nxmx: the frames of an Eiger series, {series.frames} frames of "
            f"{FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16 ({fmt_bytes(series.nbytes)} decompressed)")
    files = [series.master, *series.data_files()]
    for path in files:
        warm_cache(path)
    stored = stored_bytes(series)
    print(f"  {series.master.relative_to(ROOT)} + {len(files) - 1} data files of "
          f"{FRAMES_PER_FILE} frames, bitshuffle-LZ4, one chunk a frame: "
          f"{fmt_bytes(stored)} stored, compression ratio {series.nbytes / stored:.2f}; page "
          f"cache warmed", flush=True)
    blocks = h5py_blocks(series.master)
    master = str(series.master)
    halves = [blocks[0::2], blocks[1::2]]  # interleaved: both readers busy to the end

    with (
        ServerProcess("reference-nxmx", ["-m", "bench.reference_server", "--port", "0",
                                         "--file", master, "--kind", "nxmx", "--experiment",
                                         series.experiment, "--run", str(series.number)],
                      timeout=300) as ref,
        our_server("lclstream-nxmx") as multi,
        our_server("lclstream-nxmx-1-endpoint", partition_bytes=HUGE_PARTITION) as single,
        multi.client() as multi_client,
        single.client() as single_client,
        ThreadPoolExecutor(2) as threads,
    ):
        procs = ready_all([ClientProcess(f"h5py-{i}") for i in range(2)])
        ref_client = ref.flight_client()
        try:
            endpoints = len(multi_client.plan(series.experiment, series.number,
                                              [FRAMES]).endpoints)

            def ours(client, parallel: int) -> Callable[[], int]:
                def fetch() -> int:
                    table = client.read(series.experiment, series.number, [FRAMES],
                                        parallel=parallel)
                    if table.num_rows != series.frames:
                        raise RuntimeError(f"{table.num_rows} frames, expected {series.frames}")
                    return table.num_rows * FRAME_BYTES
                return fetch

            def in_memory() -> int:
                command = flight.FlightDescriptor.for_command(columns_ticket([FRAMES]))
                info = ref_client.get_flight_info(command)
                table = ref_client.do_get(info.endpoints[0].ticket).read_all()
                return table.num_rows * FRAME_BYTES

            read_pool = ThreadPoolExecutor(2, thread_name_prefix="read")
            described = describe(series.master, series.experiment, series.number, "nxmx",
                                 series.master.parent)

            def read_path() -> int:
                """The server's read path in this process, no network: the nxmx source's
                batches (stored chunks read and decompressed on a pool of 2 threads)."""
                frames = described.resolve([FRAMES])
                return sum(b.nbytes for b, _ in stream_batches(
                    described, frames, 0, described.num_events, 1, BatchSizing(), read_pool))

            def in_threads() -> int:
                return sum(threads.map(lambda half: h5py_read(master, half), halves))

            def in_processes() -> int:
                for proc, half in zip(procs, halves, strict=True):
                    proc.start(h5py_read, master, half)
                return sum(gather(procs))

            same = frames_equal(multi_client.read(series.experiment, series.number, [FRAMES]),
                                series)
            contenders = [
                Contender(f"lclstream: Client.read, {endpoints} endpoint"
                          f"{'s' if endpoints > 1 else ''}, parallel={PARALLEL}",
                          ours(multi_client, PARALLEL), psutil.Process(multi.pid)),
                Contender("lclstream: 1 endpoint (partition_bytes huge), 1 DoGet",
                          ours(single_client, 1), psutil.Process(single.pid)),
                Contender(f"reference: h5py + hdf5plugin, 1 process, {BLOCK_FRAMES} frames a read",
                          lambda: h5py_read(master, blocks)),
                Contender("h5py, 2 threads (one process)", in_threads),
                Contender("h5py, 2 processes", in_processes,
                          clients=[psutil.Process(p.process.pid) for p in procs]),
                Contender("in-memory Flight server, the frames decompressed at its start, "
                          "1 DoGet", in_memory, psutil.Process(ref.pid)),
                Contender("our read path in-process (source + decompression on 2 threads, "
                          "no network)", read_path),
            ]
            me = psutil.Process()
            for rep in range(args.reps + 1):  # round 0 warms up and is not counted
                for c in contenders:
                    c.measure(me)
                    if rep == 0:
                        c.reset()
        finally:
            ref_client.close()
            read_pool.shutdown()
            for p in procs:
                p.close()

    ours_c, single_c, ref_c, threads_c, procs_c, memory_c, path_c = contenders
    print(f"  {args.reps} rounds, taking turns, after one unmeasured; GB/s = 1e9 bytes/s of "
          f"decompressed frames; CPU = median CPU seconds per GiB of frames")
    rows = []
    for c in contenders:
        per_gib = GiB / c.nbytes
        rows.append([c.label, f"{c.best():.2f}", f"{c.median():.2f}",
                     f"{c.median() / ref_c.median():.2f}",
                     f"{median(c.client_cpu) * per_gib:.2f}",
                     f"{median(c.server_cpu) * per_gib:.2f}" if c.server else "-"])
    print_table(["contender", "best GB/s", "median GB/s", "/h5py median", "client CPU",
                 "server CPU"], rows, right=(1, 2, 3, 4, 5))
    print(f"  the frames are h5py's, frame for frame: {same}")
    ratio = ours_c.median() / ref_c.median()
    ok = ratio >= TARGET_NXMX and same
    verdict_line("ours/h5py, Client.read (median GB/s)", f"{ratio:.2f}", f">= {TARGET_NXMX}", ok)
    return [
        Result(NXMX, "ours/h5py, Client.read (median GB/s)",
               f"{ours_c.median():.2f}/{ref_c.median():.2f} = {ratio:.2f}",
               f">= {TARGET_NXMX}", ok),
        Result(NXMX, "ours, 1 endpoint (median GB/s)",
               f"{single_c.median():.2f} ({single_c.median() / ref_c.median():.2f} x h5py)"),
        Result(NXMX, "ours / in-memory Flight server (median GB/s)",
               f"{ours_c.median():.2f}/{memory_c.median():.2f} = "
               f"{ours_c.median() / memory_c.median():.2f}"),
        Result(NXMX, "our read path, no network / h5py (median GB/s)",
               f"{path_c.median():.2f}/{ref_c.median():.2f} = "
               f"{path_c.median() / ref_c.median():.2f}"),
        Result(NXMX, "h5py 2 threads / 2 processes (median GB/s)",
               f"{threads_c.median():.2f} / {procs_c.median():.2f}"),
        Result(NXMX, "compression ratio of the stored frames", f"{series.nbytes / stored:.2f}"),
    ]


# -- European XFEL --------------------------------------------------------------------------

XFEL_ROOT = DATA / ".euxfel"  # a data root of its own (a dot name: no experiment of DATA's)
PROPOSAL = "p900001"
XFEL_RUN = 1
SEQUENCES = 5
TRAINS_PER_SEQUENCE = 250
FIRST_TRAIN = 10000
FORMAT_VERSION = "1.2"
AGIPD_MODULES = 16
XGM_SOURCE = "SA1_XTD2_XGM/DOOCS/MAIN"
XGM_KEY = "pulseEnergy.photonFlux"  # as extra-data names it (control key, no `.value`)
XGM_COLUMN = f"{XGM_SOURCE}/{XGM_KEY}"
RUN_MAP = "karabo_data_map.json"  # extra-data's cache of a run's files, in the run directory
TARGET_EUXFEL = 1.0  # seconds, p50 from the request to the first batch of an undescribed run


def xfel_run_dir() -> Path:
    return XFEL_ROOT / PROPOSAL / "raw" / f"r{XFEL_RUN:04d}"


def aggregators() -> dict[str, tuple[Callable[[], list], int]]:
    """Aggregator name -> (its devices, made anew for each file, and its chunk size), as the
    sequence files of an SPB run with AGIPD1M hold them: one file per module, the slow data of
    the tunnel and hutch in three DA files, the detector's control devices in one more."""
    from extra_data.tests.mockdata.agipd import AGIPD1MFPGA, AGIPD1MPSC, AGIPDMDL
    from extra_data.tests.mockdata.basler_camera import BaslerCamera
    from extra_data.tests.mockdata.detectors import AGIPDModule
    from extra_data.tests.mockdata.gauge import Gauge
    from extra_data.tests.mockdata.motor import Motor
    from extra_data.tests.mockdata.tsens import TemperatureSensor
    from extra_data.tests.mockdata.xgm import XGM

    found: dict[str, tuple[Callable[[], list], int]] = {}
    for m in range(AGIPD_MODULES):
        found[f"AGIPD{m:02d}"] = (
            lambda m=m: [AGIPDModule(f"SPB_DET_AGIPD1M-1/DET/{m}CH0", frames_per_train=64)], 32)
    found["DA01"] = (lambda: [XGM(XGM_SOURCE), XGM("SPB_XTD9_XGM/DOOCS/MAIN")], 32)
    found["DA02"] = (lambda: [BaslerCamera("SPB_IRU_CAM/CAM/SIDEMIC", sensor_size=(1024, 768))],
                     32)
    found["DA03"] = (lambda: [Motor("SPB_IRU_MOTORS/MOTOR/X"), Motor("SPB_IRU_MOTORS/MOTOR/Y"),
                              Gauge("SPB_XTD9_VAC/GAUGE/G1"),
                              TemperatureSensor("SPB_XTD9_VAC/TSENS/T1")], 32)
    found["AGIPD1MCTRL00"] = (lambda: [AGIPDMDL("SPB_IRU_AGIPD1M1/MDL/FPGA_COMP"),
                                       AGIPD1MFPGA("SPB_IRU_AGIPD1M1/FPGA/MASTER_H1"),
                                       AGIPD1MPSC("SPB_IRU_AGIPD1M/PSC/HV")], 1)
    return found


def xfel_run() -> Path:
    """The run directory, written on first use into a temporary directory beside it and then
    renamed, so one that exists is complete: SEQUENCES x 20 aggregators = 100 sequence files,
    TRAINS_PER_SEQUENCE trains each. The mock writer leaves values unwritten (zeros, no disk);
    the XGM's photon flux is filled in, so that a value read is worth comparing."""
    from extra_data.tests.mockdata import write_file

    run_dir = xfel_run_dir()
    if run_dir.is_dir():
        return run_dir
    groups = aggregators()
    print(f"  generating a European XFEL run of {SEQUENCES * len(groups)} sequence files "
          f"{run_dir.relative_to(ROOT)} ...", flush=True)
    tmp = run_dir.parent / f".{run_dir.name}-writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flux = f"CONTROL/{XGM_SOURCE}/{XGM_KEY.replace('.', '/')}/value"
    for s in range(SEQUENCES):
        first = FIRST_TRAIN + s * TRAINS_PER_SEQUENCE
        for name, (devices, chunksize) in groups.items():
            path = tmp / f"RAW-R{XFEL_RUN:04d}-{name}-S{s:05d}.h5"
            write_file(str(path), devices(), ntrains=TRAINS_PER_SEQUENCE, firsttrain=first,
                       chunksize=chunksize, format_version=FORMAT_VERSION)
            if name == "DA01":
                with h5py.File(path, "r+") as f:
                    f[flux][:] = 1000.0 + np.arange(first, first + TRAINS_PER_SEQUENCE) % 97
    tmp.rename(run_dir)
    return run_dir


def forget_run_map(run_dir: Path) -> None:
    """Remove extra-data's cache of the run's files, so the next reader opens every file."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir / RUN_MAP).unlink()


# The reference, in a process of its own: imports first (timed apart), then RunDirectory and
# the first train of the key, timed; one JSON line out.
REFERENCE_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import extra_data
t1 = time.perf_counter()
run = extra_data.RunDirectory(sys.argv[1])
value = run[sys.argv[2], sys.argv[3]].select_trains(np.s_[:1]).ndarray()
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "first": t2 - t1, "files": len(run.files),
                  "trains": len(run.train_ids), "value": float(value[0])}))
"""


def reference_first(run_dir: Path) -> dict:
    """One reference process; its timings, and its wall time from spawn to exit."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, str(run_dir), XGM_SOURCE,
                           XGM_KEY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"extra_data reference failed: {done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    answer["wall"] = wall
    return answer


class XfelServer(ServerProcess):
    """`lclstream serve` (authentication on, the bench's token) over XFEL_ROOT."""

    def __init__(self, name: str = "lclstream-euxfel") -> None:
        super().__init__(name, ["-m", "flight_server.cli", "serve", "--data", str(XFEL_ROOT),
                                "--port", "0", "--state-dir", str(STATE)], token=bench_token())


@dataclass
class FirstBatch:
    plan: float  # GetFlightInfo
    total: float  # GetFlightInfo + DoGet to the first batch in hand
    value: float  # the first train's value


def first_batch(client, raw, column: str) -> FirstBatch:
    """GetFlightInfo of the run's main table (one column), DoGet of the first endpoint, the
    first batch read, the stream cancelled."""
    t0 = time.perf_counter()
    info = client.plan(PROPOSAL, XFEL_RUN, [column])
    t1 = time.perf_counter()
    reader = raw.do_get(info.endpoints[0].ticket)
    batch = reader.read_chunk().data
    t2 = time.perf_counter()
    reader.cancel()
    return FirstBatch(t1 - t0, t2 - t0, float(batch.column(column)[0].as_py()))


def cold_request(run_dir: Path) -> tuple[FirstBatch, FirstBatch, FirstBatch, float]:
    """A fresh server: its start-up (returned, not counted), then the first request for the run
    (cold: a new process, nothing described); a file touched, the request again (the run
    described anew on a warm server); and once more (the run described: warm)."""
    forget_run_map(run_dir)
    t0 = time.perf_counter()
    with XfelServer() as server, server.client() as client:
        started = time.perf_counter() - t0
        raw = server.flight_client()
        try:
            client.whoami()  # connected and the token checked: no part of describing a run
            list(raw.list_actions())
            cold = first_batch(client, raw, XGM_COLUMN)
            forget_run_map(run_dir)
            os.utime(next(run_dir.glob("*-DA01-S00000.h5")))
            touched = first_batch(client, raw, XGM_COLUMN)
            warm = first_batch(client, raw, XGM_COLUMN)
        finally:
            raw.close()
    return cold, touched, warm, started


def run_euxfel(args: argparse.Namespace) -> list[Result]:
    reps = args.reps
    run_dir = xfel_run()
    files = sorted(p for p in run_dir.iterdir() if p.suffix == ".h5")
    section(f"euxfel: request to first batch of a European XFEL run of {len(files)} sequence "
            f"files, not yet described")
    on_disk = sum(p.stat().st_size for p in files)
    for path in files:
        warm_cache(path)
    print(f"  {run_dir.relative_to(ROOT)}: {len(files)} files, {fmt_bytes(on_disk)}, "
          f"{SEQUENCES * TRAINS_PER_SEQUENCE} trains; page cache warmed; column {XGM_COLUMN}",
          flush=True)

    # unmeasured: one cold request (and the check that the column is served), one reference
    cold_request(run_dir)
    reference_first(run_dir)
    cold, touched, warm, starts = [], [], [], []
    ref_cold, ref_mapped = [], []
    for _ in range(reps):  # taking turns; each reference in a fresh process
        ref_mapped.append(reference_first(run_dir))  # with the map the last one saved
        c, t, w, s = cold_request(run_dir)
        cold.append(c)
        touched.append(t)
        warm.append(w)
        starts.append(s)
        forget_run_map(run_dir)
        ref_cold.append(reference_first(run_dir))
    values = {b.value for b in cold + touched + warm} | {r["value"] for r in ref_cold}
    same = len(values) == 1

    def row(label: str, xs: list[float]) -> list[str]:
        return [label, *(f"{percentile(xs, q) * 1e3:.0f}" for q in (50, 90)),
                f"{min(xs) * 1e3:.0f}", f"{max(xs) * 1e3:.0f}"]

    print(f"  {reps} repetitions, taking turns; a fresh server process each (start-up "
          f"{median(starts):.2f} s, not counted) and a fresh reference process each; "
          f"no {RUN_MAP} unless said")
    print_table(["ms", "p50", "p90", "min", "max"], [
        row("lclstream: first request after start, GetFlightInfo + DoGet to first batch",
            [b.total for b in cold]),
        row("  of which GetFlightInfo (describes the run)", [b.plan for b in cold]),
        row("lclstream: after a file was touched (described anew, warm server)",
            [b.total for b in touched]),
        row("lclstream: run already described (warm)", [b.total for b in warm]),
        row("extra_data: RunDirectory + first train of the key", [r["first"] for r in ref_cold]),
        row(f"extra_data: the same with its {RUN_MAP}", [r["first"] for r in ref_mapped]),
        row("  its imports (numpy, extra_data), not counted", [r["imports"] for r in ref_cold]),
        row("  its process, spawn to exit", [r["wall"] for r in ref_cold]),
    ], right=(1, 2, 3, 4))
    print(f"  extra_data sees {ref_cold[0]['files']} files, {ref_cold[0]['trains']} trains; "
          f"the first train's value is the same everywhere: {same} ({sorted(values)})")
    p50 = percentile([b.total for b in cold], 50)
    ref_p50 = percentile([r["first"] for r in ref_cold], 50)
    ok = p50 < TARGET_EUXFEL and same
    verdict_line("cold request to first batch, p50", f"{p50 * 1e3:.0f} ms",
                 f"< {TARGET_EUXFEL * 1e3:.0f} ms", ok)
    return [
        Result(EUXFEL, f"cold request to first batch, {len(files)} files (p50)",
               f"{p50 * 1e3:.0f} ms", f"< {TARGET_EUXFEL * 1e3:.0f} ms", ok),
        Result(EUXFEL, "after a touch / warm (p50)",
               f"{percentile([b.total for b in touched], 50) * 1e3:.0f} / "
               f"{percentile([b.total for b in warm], 50) * 1e3:.0f} ms"),
        Result(EUXFEL, "extra_data RunDirectory + first train (p50)", f"{ref_p50 * 1e3:.0f} ms"),
        Result(EUXFEL, "ours / extra_data, cold (p50)", f"{p50 / ref_p50:.2f}"),
    ]
