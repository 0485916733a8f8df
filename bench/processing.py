"""Server-side processing: what the `peaks` step costs, what processing saves on the wire, and how
fast the PyTorch reader feeds a training loop.

1. **peaks throughput**: frames/s of the `peaks` step (`flight_server.processing.build_pipeline`,
   applied to Arrow batches of 4 frames, as the server's 4 MiB batches hold) on synthetic 1 MiB
   uint16 frames (512x1024, about 30 Gaussian peaks on noise), beside a plain numpy +
   `scipy.ndimage` implementation of the same algorithm, written here, one frame at a time: tile
   median / MAD background, `ndimage.maximum_filter` for the brightest pixel within the radius,
   the same window / ring tests, intensity and centroid. Both must find the same peaks (counts
   within 1 %); the target is ours / reference >= 1.0.
2. **bytes on the wire** (informational): on the demo data (`bench-data/demo`, written once),
   the plan's `total_bytes` and the Arrow bytes actually received for raw CXI frames against
   `peaks` + `hits`, and raw `tof/waveforms` against `tof_integrate`.
3. **torch reader**: samples/s of `clients.torch.FlightDataset` (our server process,
   authentication on, `batch_size=64`, `num_workers=0`) against a map-style
   `torch.utils.data.Dataset` reading the same frames one event at a time from the local HDF5
   file with h5py (DataLoader `batch_size=64`, `num_workers=0`), page cache warm, taking turns.
   The target is ours / h5py >= 0.8.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import (
    DATA,
    STATE,
    Result,
    ServerProcess,
    bench_token,
    fmt_bytes,
    measure_each,
    median,
    our_server,
    print_table,
    section,
    verdict_line,
    warm_cache,
)

NAME = "processing"

FRAME_SHAPE = (512, 1024)  # uint16: 1 MiB a frame
PEAKS_PER_FRAME = 30
FRAMES_PER_BATCH = 4  # the server's 4 MiB batches
SNR, MIN_PIXELS, RADIUS = 5.0, 2, 3  # the step's defaults
MIN_TILE, MAD_SIGMA = 16, 1.4826
COUNT_TOLERANCE = 0.01  # total peak counts of ours and the reference may differ by 1 %

DEMO = DATA / "demo"
CXI_EXPERIMENT, CXI_RUN, CXI_FRAMES = "cxilu9218", 12, "entry_1/data_1/data"
TOF_EXPERIMENT, TOF = "tmox42619", "tof/waveforms"

TORCH_EXPERIMENT, TORCH_COLUMN, TORCH_BATCH = "bench_lcls2", "pnccd/image", 64


# -- 1. peaks throughput -------------------------------------------------------------------


def synthetic_frames(n: int, seed: int = 0) -> np.ndarray:
    """n uint16 frames of FRAME_SHAPE: a pedestal of 100 ADU, Gaussian noise of 3 ADU and about
    PEAKS_PER_FRAME Gaussian peaks (sigma 0.8 to 1.5 px, 800 to 20000 ADU in all) at random
    sub-pixel positions in cells 32 px apart, so no two overlap."""
    rng = np.random.default_rng(seed)
    h, w = FRAME_SHAPE
    cells = [(cy, cx) for cy in range(16, h - 15, 32) for cx in range(16, w - 15, 32)]
    d = np.arange(-6, 7)
    out = np.empty((n, h, w), np.uint16)
    for i in range(n):
        frame = rng.normal(100.0, 3.0, (h, w)).astype(np.float32)
        count = int(rng.integers(PEAKS_PER_FRAME - 5, PEAKS_PER_FRAME + 6))
        for c in rng.choice(len(cells), count, replace=False):
            y, x = cells[c][0] + rng.uniform(-4, 4), cells[c][1] + rng.uniform(-4, 4)
            s, total = rng.uniform(0.8, 1.5), rng.uniform(800, 20000)
            rows, cols = round(y) + d, round(x) + d
            frame[rows[:, None], cols[None, :]] += (
                total / (2 * np.pi * s * s)
                * np.exp(-((cols[None, :] - x) ** 2 + (rows[:, None] - y) ** 2) / (2 * s * s)))
        out[i] = np.clip(np.rint(frame), 0, 65535)
    return out


def frame_batches(frames: np.ndarray) -> list[pa.RecordBatch]:
    """The frames as batches of one fixed_shape_tensor column "img", FRAMES_PER_BATCH each."""
    batches = []
    for a in range(0, len(frames), FRAMES_PER_BATCH):
        part = frames[a:a + FRAMES_PER_BATCH]
        flat = pa.array(part.reshape(-1))
        storage = pa.FixedSizeListArray.from_arrays(flat, part[0].size)
        img = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(flat.type, list(FRAME_SHAPE)),
                                             storage)
        batches.append(pa.RecordBatch.from_arrays([img], names=["img"]))
    return batches


class ReferencePeaks:
    """The peaks step's algorithm (see `flight_server/processing/peaks.py`) as a user would write
    it with numpy and scipy.ndimage, one frame at a time."""

    def __init__(self, shape: tuple[int, int], snr: float = SNR, min_pixels: int = MIN_PIXELS,
                 radius: int = RADIUS, integer: bool = True) -> None:
        from scipy import ndimage

        self.ndimage = ndimage
        self.snr, self.min_pixels, self.radius = snr, min_pixels, radius
        self.floor = 1 / math.sqrt(12) if integer else 0.0
        h, w = shape
        tile = max(MIN_TILE, 4 * radius + 2)
        self.th, self.tw = h // max(1, h // tile), w // max(1, w // tile)
        self.ny, self.nx = h // self.th, w // self.tw
        # pixel -> tile; the rest of an axis belongs to the last tile
        self.ty = np.minimum(np.arange(h) // self.th, self.ny - 1)
        self.tx = np.minimum(np.arange(w) // self.tw, self.nx - 1)
        d = np.arange(-radius, radius + 1)
        self.wy, self.wx = (a.ravel() for a in np.meshgrid(d, d, indexing="ij"))
        e = np.arange(-radius - 2, radius + 3)
        ry, rx = (a.ravel() for a in np.meshgrid(e, e, indexing="ij"))
        ring = np.maximum(abs(ry), abs(rx)) > radius
        self.ry, self.rx = ry[ring], rx[ring]
        self.pad = radius + 2

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, intensity) of one frame's peaks, brightest first."""
        f = frame.astype(np.float32)
        tiles = (f[:self.ny * self.th, :self.nx * self.tw]
                 .reshape(self.ny, self.th, self.nx, self.tw).transpose(0, 2, 1, 3)
                 .reshape(self.ny, self.nx, -1))
        bg = np.median(tiles, axis=-1)
        sigma = np.maximum(np.median(np.abs(tiles - bg[..., None]), axis=-1) * MAD_SIGMA,
                           self.floor)
        threshold = (bg + self.snr * sigma)[self.ty[:, None], self.tx[None, :]]
        size = 2 * self.radius + 1  # the brightest within the radius is a 3x3 maximum too
        top = self.ndimage.maximum_filter(f, size=size, mode="constant", cval=-np.inf) == f
        yy, xx = np.nonzero(top & (f > threshold))
        if not len(yy):
            empty = np.empty(0, np.float32)
            return empty, empty, empty
        p = self.pad
        padded = np.pad(f, p, constant_values=np.nan)
        win = padded[(yy + p)[:, None] + self.wy, (xx + p)[:, None] + self.wx]
        ring = padded[(yy + p)[:, None] + self.ry, (xx + p)[:, None] + self.rx]
        local = np.nanmedian(ring, axis=1)
        tile_bg, tile_sigma = bg[self.ty[yy], self.tx[xx]], sigma[self.ty[yy], self.tx[xx]]
        local = np.where(np.isnan(local), tile_bg, local)
        level = local + self.snr * tile_sigma
        enough = (np.nan_to_num(win, nan=-np.inf) > level[:, None]).sum(axis=1) >= self.min_pixels
        yy, xx, win, local = yy[enough], xx[enough], win[enough], local[enough]
        signal = np.nan_to_num(win - local[:, None], nan=0.0)
        intensity = signal.sum(axis=1)
        weight = np.maximum(signal, 0)
        total = weight.sum(axis=1)
        x = xx + (weight @ self.wx) / total
        y = yy + (weight @ self.wy) / total
        order = np.argsort(-intensity, kind="stable")
        return x[order], y[order], intensity[order]


def peaks_throughput(args: argparse.Namespace) -> list[Result]:
    from flight_server.processing import build_pipeline

    section("processing: peaks throughput")
    n = 16 if args.quick else 64
    reps = 2 if args.quick else args.reps
    frames = synthetic_frames(n)
    batches = frame_batches(frames)
    pipeline = build_pipeline([{"step": "peaks", "column": "img"}], batches[0].schema)
    reference = ReferencePeaks(FRAME_SHAPE)
    print(f"  {n} synthetic {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} uint16 frames "
          f"({fmt_bytes(frames.nbytes)}), batches of {FRAMES_PER_BATCH}, {reps} repetitions "
          f"after one unmeasured round", flush=True)

    def ours() -> list[int]:
        counts: list[int] = []
        for batch in batches:
            counts += pipeline.apply(batch).column("img/n_peaks").to_pylist()
        return counts

    def ref() -> list[int]:
        return [len(reference(frame)[0]) for frame in frames]

    times: dict[str, list[float]] = {"lclstream peaks step": [], "numpy + scipy.ndimage": []}
    counts: dict[str, list[int]] = {}
    for rep in range(reps + 1):  # taking turns; round 0 unmeasured
        for label, fn in zip(times, (ours, ref), strict=True):
            t0 = time.perf_counter()
            counts[label] = fn()
            if rep:
                times[label].append(time.perf_counter() - t0)

    (a, b), (ca, cb) = times.values(), counts.values()
    rows = []
    for (label, t), c in zip(times.items(), counts.values(), strict=True):
        rows.append([label, f"{n / median(t):.1f}", f"{n / min(t):.1f}",
                     f"{median(t) / n * 1e3:.1f} ms", f"{sum(c)}",
                     f"{median(b) / median(t):.2f}"])
    print_table(["contender", "median frames/s", "best frames/s", "per frame", "peaks found",
                 "/ reference"], rows, right=(1, 2, 3, 4, 5))
    differ = sum(x != y for x, y in zip(ca, cb, strict=True))
    agree = abs(sum(ca) - sum(cb)) <= max(1, COUNT_TOLERANCE * sum(cb))
    print(f"  peak counts: ours {sum(ca)}, reference {sum(cb)} "
          f"({sum(ca) / n:.1f} a frame); {differ} of {n} frames differ", flush=True)
    ratio = median(b) / median(a)
    ok = ratio >= 1.0 and agree
    verdict_line("peaks frames/s, ours / reference (median)", f"{ratio:.2f}", ">= 1.0", ok)
    verdict_line("peak counts agree (total within 1 %)", "yes" if agree else "no", "yes", agree)
    return [
        Result(NAME, "peaks frames/s, ours (reference)",
               f"{n / median(a):.1f} ({n / median(b):.1f})"),
        Result(NAME, "peaks ours / numpy+scipy reference (median)", f"{ratio:.2f}",
               ">= 1.0", ratio >= 1.0),
        Result(NAME, "peaks counts, ours vs reference", f"{sum(ca)} vs {sum(cb)}",
               "within 1 %", agree),
    ]


# -- 2. bytes on the wire ------------------------------------------------------------------


def demo_server() -> ServerProcess:
    """Our server over the demo data root, authentication on (the bench's token: same state)."""
    from flight_server.generator import generate_demo

    if not (DEMO / CXI_EXPERIMENT).exists() or not (DEMO / TOF_EXPERIMENT).exists():
        print(f"  generating the demo data in {DEMO.relative_to(DATA.parent)} ...", flush=True)
    generate_demo(DEMO)
    args = ["-m", "flight_server.cli", "serve", "--data", str(DEMO), "--port", "0",
            "--state-dir", str(STATE)]
    return ServerProcess("lclstream-demo", args, token=bench_token())


def received(client, experiment: str, runs: list[int], columns: list[str],
             processing: list[dict] | None) -> tuple[int, int, int]:
    """(plan total_bytes, Arrow bytes received, events received) of one request."""
    info = client.plan(experiment, runs, columns, processing=processing)
    nbytes = rows = 0
    for batch in client.batches(info):
        nbytes += batch.nbytes
        rows += batch.num_rows
    return info.total_bytes, nbytes, rows


def wire_bytes(args: argparse.Namespace) -> list[Result]:
    section("processing: bytes on the wire (demo data)")
    peaks = [{"step": "peaks", "column": CXI_FRAMES},
             {"step": "hits", "column": f"{CXI_FRAMES}/n_peaks", "min": 10}]
    integrate = [{"step": "tof_integrate", "column": TOF, "baseline": [0, 64],
                  "windows": {"a": [100, 200], "b": [300, 400], "c": [500, 600],
                              "d": [700, 800]}}]
    with demo_server() as server, server.client() as client:
        tof_runs = sorted(int(r) for r in client.runs(TOF_EXPERIMENT)["run"].to_list())
        cases = [
            (f"{CXI_EXPERIMENT} run {CXI_RUN}", f"raw {CXI_FRAMES}", CXI_EXPERIMENT, [CXI_RUN],
             [CXI_FRAMES], None),
            (f"{CXI_EXPERIMENT} run {CXI_RUN}", "peaks + hits (min 10)", CXI_EXPERIMENT,
             [CXI_RUN], [CXI_FRAMES], peaks),
            (f"{TOF_EXPERIMENT} runs {tof_runs[0]}-{tof_runs[-1]}", f"raw {TOF}", TOF_EXPERIMENT,
             tof_runs, [TOF], None),
            (f"{TOF_EXPERIMENT} runs {tof_runs[0]}-{tof_runs[-1]}", "tof_integrate (4 windows)",
             TOF_EXPERIMENT, tof_runs, [TOF], integrate),
        ]
        got = [received(client, exp, runs, cols, steps) for _, _, exp, runs, cols, steps in cases]
    rows = []
    for i, ((data, what, *_), (plan, nbytes, events)) in enumerate(zip(cases, got, strict=True)):
        raw_plan, raw_bytes = got[i - i % 2][:2]
        rows.append([data, what, f"{events}", fmt_bytes(plan) if plan >= 0 else str(plan),
                     fmt_bytes(nbytes), "-" if i % 2 == 0 else f"{raw_bytes / nbytes:.0f}x",
                     "-" if i % 2 == 0 or plan <= 0 else f"{raw_plan / plan:.1f}x"])
    print_table(["data", "request", "events", "plan total_bytes", "received", "reduction",
                 "planned reduction"], rows, right=(2, 3, 4, 5, 6))
    results = []
    for i, label in ((1, "peaks + hits vs raw CXI frames"), (3, "tof_integrate vs raw waveforms")):
        factor = got[i - 1][1] / max(1, got[i][1])
        verdict_line(f"received bytes, {label}", f"{factor:.0f}x smaller", "-", None)
        results.append(Result(NAME, f"received bytes, {label}",
                              f"{fmt_bytes(got[i][1])} / {fmt_bytes(got[i - 1][1])} "
                              f"({factor:.0f}x smaller)"))
    return results


# -- 3. torch reader -----------------------------------------------------------------------


def torch_run(events: int) -> Path:
    """An LCLS2 run of `events` events (128x128 uint16 `pnccd/image`), written on first use as
    run number `events` of experiment `bench_lcls2`."""
    from flight_server.generator import generate_lcls2_run

    path = DATA / TORCH_EXPERIMENT / f"{TORCH_EXPERIMENT}_Run{events:04d}.h5"
    if not path.exists():
        print(f"  generating a {events}-event LCLS2 run {path.relative_to(DATA.parent)} ...",
              flush=True)
        generate_lcls2_run(path, events, events, seed=7, chunk_events=16)
    return path


class H5Frames:
    """Map-style dataset: one event's frame read from the HDF5 file per `__getitem__`, the file
    opened once (in the process that first reads, as a worker would)."""

    def __init__(self, path: Path, column: str) -> None:
        import h5py

        self.path, self.column = path, column
        with h5py.File(path, "r") as f:
            self.length = len(f[column])
        self._data = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> np.ndarray:
        if self._data is None:
            import h5py

            self._data = h5py.File(self.path, "r")[self.column]
        return self._data[i]


def torch_reader(args: argparse.Namespace) -> list[Result]:
    import torch.utils.data

    from clients.torch import FlightDataset

    section("processing: torch reader")
    events = 1000 if args.quick else 4000
    epochs = 5 if args.quick else 10  # a round reads the run this many times: seconds, not ms
    rounds = 2 if args.quick else args.reps
    path = torch_run(events)
    warm_cache(path)

    class Map(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.inner = H5Frames(path, TORCH_COLUMN)

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, i: int):
            return self.inner[i]

    with our_server("lclstream-torch") as server:
        def flight_epoch() -> int:
            ds = FlightDataset(server.location, TORCH_EXPERIMENT, [events], [TORCH_COLUMN],
                               batch_size=TORCH_BATCH, token=server.token)
            n = 0
            for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0):
                n += len(batch[TORCH_COLUMN])
            return n

        def h5py_epoch() -> int:
            loader = torch.utils.data.DataLoader(Map(), batch_size=TORCH_BATCH, num_workers=0)
            return sum(len(b) for b in loader)

        contenders = {"FlightDataset (our server)": flight_epoch,
                      "h5py map-style Dataset (local file)": h5py_epoch}
        times: dict[str, list[float]] = {k: [] for k in contenders}
        seen: dict[str, int] = {}
        for rnd in range(rounds + 1):  # taking turns; round 0 unmeasured
            for label, fn in contenders.items():
                t0 = time.perf_counter()
                seen[label] = sum(fn() for _ in range(epochs)) // epochs
                if rnd:
                    times[label].append(time.perf_counter() - t0)

    flight_t, h5_t = times.values()
    samples = events * epochs
    rows = [[label, f"{seen[label]} x {epochs}", f"{samples / median(t):,.0f}",
             f"{samples / min(t):,.0f}", f"{median(t):.2f} s",
             f"{median(h5_t) / median(t):.2f}"] for label, t in times.items()]
    print(f"  run {events} of {TORCH_EXPERIMENT} ({fmt_bytes(path.stat().st_size)}), "
          f"{TORCH_COLUMN} 1x128x128 uint16, batches of {TORCH_BATCH}, num_workers=0; "
          f"a round is {epochs} epochs (a new plan and connection each), {rounds} rounds "
          "after one unmeasured, taking turns", flush=True)
    print_table(["reader", "samples", "median samples/s", "best samples/s", "median round",
                 "/ h5py"], rows, right=(1, 2, 3, 4, 5))
    complete = len(set(seen.values())) == 1 and seen[next(iter(seen))] == events
    ratio = median(h5_t) / median(flight_t)
    verdict_line("torch samples/s, FlightDataset / h5py (median)", f"{ratio:.2f}", ">= 0.8",
                 ratio >= 0.8 and complete)
    if not complete:
        print(f"  WARNING: readers saw {seen}, expected {events} samples each", file=sys.stderr)
    return [
        Result(NAME, "torch samples/s, FlightDataset (h5py)",
               f"{samples / median(flight_t):,.0f} ({samples / median(h5_t):,.0f})"),
        Result(NAME, "torch FlightDataset / h5py Dataset (median)", f"{ratio:.2f}", ">= 0.8",
               ratio >= 0.8 and complete),
    ]


def run(args: argparse.Namespace) -> list[Result]:
    return measure_each(NAME, (peaks_throughput, wire_bytes, torch_reader), args)

