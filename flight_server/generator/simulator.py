"""A simulated acquisition: demo events made now, as Arrow RecordBatches, sent to a live stream.

The events are the demo runs' events (`generator/lcls2.py`): pnCCD frames with Bragg spots and
the peak lists that describe them, two-channel ion TOF traces, pulse and photon energy, the
pump-probe event code, and the LCLS2 raw `timestamp` with its derived `time`; but stamped with the
current time and never ending. Columns carry the types and field metadata (units, detector,
HDF5 path, fill value) the server gives the archived demo runs, so a monitor written against a
live stream works unchanged on a run, and the run a stream ends as reads like the demo runs.

The physics comes from `generator/physics.py`, drawn segment by segment (a minute of beam per
segment) from random streams of their own: the scalars of a segment are drawn at once, so that
the slow drifts of pulse and photon energy run on across segment boundaries (a segment is a
whole number of both periods), and frames and traces are rendered per batch, so a batch costs
only its own events. Every segment draws new values: the stream does not repeat itself.

    >>> from clients import connect
    >>> from flight_server.generator.simulator import produce
    >>> produce(connect(), "tmox42619", "daq", rate=120, events=1200, end_run=True)
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from flight_server.generator import lcls2
from flight_server.generator import physics as ph
from flight_server.sources.columns import field_metadata, time_column
from schemas import metadata as md

if TYPE_CHECKING:
    from clients import Client
    from clients.live import Producer

DEFAULT_RATE_HZ = 120.0
SEGMENT_EVENTS = 7200
"""Events drawn at once: a minute at 120 Hz, and a whole number of the 1800-event period of the
pulse-energy drift and the 2400-event period of the photon-energy wander."""
PROGRESS_EVERY_S = 5.0
MAX_LAG_S = 1.0
"""A producer further behind its schedule than this (a slow machine) starts a new schedule
rather than sending the backlog in a burst."""


def run_config(tof_samples: int = 1024) -> dict[str, Any]:
    """The per-run configuration the demo runs carry (`/UserDataCfg`), for `end_run`."""
    return {"tof": {"window_ns": [0.0, tof_samples * ph.TOF_SAMPLE_PERIOD_NS],
                    "sample_period_ns": ph.TOF_SAMPLE_PERIOD_NS},
            "pnccd": {"pedestal_adu": lcls2.PEDESTAL_ADU}}


def event_schema(frame_shape: tuple[int, int] = (128, 128), tof_samples: int = 1024
                 ) -> pa.Schema:
    """The columns of a simulated event, as the server serves a demo run's (without `run`)."""
    h, w = frame_shape
    nan, missing_int = float("nan"), lcls2.MISSING_INT

    def field(name: str, arrow_type: pa.DataType, units: str | None = None,
              sentinel: float | None = None) -> pa.Field:
        return pa.field(name, arrow_type, metadata=field_metadata(name, units, sentinel))

    time_field = time_column("timestamp", ph.UNIX_AT_1990).field
    return pa.schema([
        time_field,
        field("timestamp", pa.int64()),
        field("ebeam/photon_energy", pa.float64(), "eV", nan),
        field("evr/code_40", pa.int64(), None, missing_int),
        field("gmd/energy", pa.float64(), "mJ", nan),
        field("peaks/var_intensity", pa.list_(pa.float32()), "ADU"),
        field("peaks/var_x", pa.list_(pa.float32()), "pixel"),
        field("peaks/var_y", pa.list_(pa.float32()), "pixel"),
        field("pnccd/image", pa.fixed_shape_tensor(pa.uint16(), [1, h, w]), "ADU"),
        field("tof/waveforms",
              pa.fixed_shape_tensor(pa.float32(), [lcls2.TOF_CHANNELS, tof_samples]), "V"),
    ])


@dataclass
class _Segment:
    """The per-shot draws of SEGMENT_EVENTS consecutive shots; frames and traces are rendered
    from them on demand, in order, since their noise streams are consumed event by event."""

    first: int  # the simulator's event index of the segment's first shot
    pulse: np.ndarray
    gmd: np.ndarray  # pulse energy as the diagnostic reports it: NaN where it missed a shot
    photon: np.ndarray
    code_40: np.ndarray  # -99999 where the event code was not read
    spots: ph.Spots
    heights: np.ndarray
    frame_rng: np.random.Generator
    tof_rng: np.random.Generator


class Simulator:
    """Demo events made on request: `batch(n)` returns the next n shots as a RecordBatch.

    `seed` makes the sequence of values reproducible (the time stamps are the clock's); without
    one every simulator draws its own. `rate` is the shot rate the time stamps within a batch
    are spaced by."""

    def __init__(self, seed: int | None = None, *, rate: float = DEFAULT_RATE_HZ,
                 frame_shape: tuple[int, int] = (128, 128), tof_samples: int = 1024) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.rate = float(rate)
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.tof_samples = int(tof_samples)
        self.schema = event_schema(self.frame_shape, self.tof_samples)
        self.events = 0  # shots made so far
        self._profiles = ph.tof_profiles(self.tof_samples, lcls2.TOF_CHANNELS)
        self._segment = self._draw(0)

    def _draw(self, index: int) -> _Segment:
        """Segment `index`: the generator's physics, keyed by (seed, segment) like a run."""
        n, key = SEGMENT_EVENTS, index + 1
        pulse = ph.pulse_energy_mj(ph.stream(self.seed, key, "gmd/energy"), n)
        gmd = ph.with_missing_float(pulse, ph.stream(self.seed, key, "gmd/missing"),
                                    lcls2.MISSING_FRACTION)
        photon = ph.photon_energy_ev(ph.stream(self.seed, key, "ebeam/photon_energy"), n,
                                     9500.0, 10.0)
        laser = (np.arange(n) % 2 == 0).astype(np.int64)  # pump-probe: every other shot
        code_40 = ph.with_missing_int(laser, ph.stream(self.seed, key, "evr/missing"),
                                      lcls2.MISSING_FRACTION, lcls2.MISSING_INT)
        counts = ph.spot_counts(ph.stream(self.seed, key, "pnccd/hits"), n, lcls2.HIT_FRACTION,
                                5, 25.0, 80)
        spots = ph.draw_spots(ph.stream(self.seed, key, "pnccd/spots"), counts, pulse,
                              self.frame_shape)
        heights = ph.tof_heights(ph.stream(self.seed, key, "tof/heights"), pulse,
                                 lcls2.TOF_CHANNELS)
        return _Segment(index * n, pulse, gmd, photon, code_40, spots, heights,
                        ph.stream(self.seed, key, "pnccd/noise"),
                        ph.stream(self.seed, key, "tof/noise"))

    def _part(self, n: int) -> dict[str, np.ndarray]:
        """Up to n next shots, all from the current segment (fewer at its end)."""
        seg = self._segment
        a = self.events - seg.first
        if a >= SEGMENT_EVENTS:
            seg = self._segment = self._draw(seg.first // SEGMENT_EVENTS + 1)
            a = 0
        b = min(a + n, SEGMENT_EVENTS)
        frames = ph.render_frames(seg.frame_rng, self.frame_shape, seg.pulse[a:b], seg.spots, a,
                                  lcls2.PEDESTAL_ADU, lcls2.NOISE_ADU, lcls2.RING_ADU_PER_MJ)
        lo, hi = seg.spots.offsets[a], seg.spots.offsets[b]
        self.events += b - a
        return {
            "gmd": seg.gmd[a:b], "photon": seg.photon[a:b], "code_40": seg.code_40[a:b],
            "counts": seg.spots.counts[a:b], "x": seg.spots.x[lo:hi], "y": seg.spots.y[lo:hi],
            "intensity": seg.spots.intensity[lo:hi],
            "image": ph.to_uint16(frames)[:, None],
            "tof": ph.tof_waveforms(seg.tof_rng, seg.heights[a:b], self._profiles),
        }

    def batch(self, n: int = 1, end_ns: int | None = None) -> pa.RecordBatch:
        """The next `n` shots; the last one happened at `end_ns` (Unix ns, default now) and
        the others 1/rate apart before it."""
        if n < 1:
            raise ValueError(f"a batch needs at least one event, got {n}")
        end_ns = time.time_ns() if end_ns is None else int(end_ns)
        parts = []
        while sum(len(p["gmd"]) for p in parts) < n:
            parts.append(self._part(n - sum(len(p["gmd"]) for p in parts)))
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        back = np.arange(n - 1, -1, -1, dtype=np.int64)
        unix_ns = end_ns - (back * ph.NS_PER_S / self.rate).astype(np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(cat["counts"])]).astype(np.int32))

        def ragged(values: np.ndarray) -> pa.Array:
            return pa.ListArray.from_arrays(offsets, pa.array(values))

        def tensor(values: np.ndarray, field: pa.Field) -> pa.Array:
            flat = pa.array(values.reshape(-1))
            storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(values.shape[1:]))
            return pa.ExtensionArray.from_storage(field.type, storage)

        s = self.schema
        gmd, code = cat["gmd"], cat["code_40"]
        arrays = [
            pa.array(unix_ns, s.field(md.TIME_COLUMN).type),
            pa.array(ph.pack_time(unix_ns, ph.UNIX_AT_1990)),
            pa.array(cat["photon"], pa.float64()),
            pa.array(code, pa.int64(), mask=code == lcls2.MISSING_INT),
            pa.array(gmd, pa.float64(), mask=np.isnan(gmd)),
            ragged(cat["intensity"]),
            ragged(cat["x"]),
            ragged(cat["y"]),
            tensor(cat["image"], s.field("pnccd/image")),
            tensor(cat["tof"], s.field("tof/waveforms")),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=s)

    def batches(self, batch_events: int = 1) -> Iterator[pa.RecordBatch]:
        """Batches of `batch_events` shots, stamped when they are taken, forever."""
        while True:
            yield self.batch(batch_events)


def produce(
    client: Client,
    experiment: str,
    stream: str,
    rate: float = DEFAULT_RATE_HZ,
    events: int | None = None,
    batch_events: int = 1,
    end_run: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    stop: threading.Event | None = None,
    simulator: Simulator | None = None,
    seed: int | None = None,
    retention_bytes: int | None = None,
    retention_seconds: float | None = None,
    producer_id: str | None = None,
    progress_every: float = PROGRESS_EVERY_S,
) -> dict[str, Any]:
    """Send simulated events to live stream `stream` of `experiment` at `rate` events/s.

    `client` is a `clients.Client` with the `write` grant. Batches of `batch_events` leave on
    an absolute schedule, each when its last event is due (event i at i / rate after the
    start), so the time spent making, sending and sleeping adds no drift. Runs until `events`
    are sent, or forever when it is None, until `stop` is set or Ctrl-C; then waits until the
    server has stored everything and, with `end_run`, ends the stream as a run of the
    experiment (with the demo runs' configuration). `simulator` (default: a new one, with
    `seed`) makes the events. `progress`, if given, is called with the running summary every
    `progress_every` seconds while sending. Returns the summary: events, batches, bytes,
    seconds and rate of sending, whether it was stopped, the next stream offset, and the run
    the stream became."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 events/s, got {rate}")
    if batch_events < 1:
        raise ValueError(f"batch_events must be >= 1, got {batch_events}")
    if events is not None and events < 0:
        raise ValueError(f"events must be >= 0, got {events}")
    sim = simulator or Simulator(seed, rate=rate)
    stop = stop or threading.Event()
    summary: dict[str, Any] = {"experiment": experiment, "stream": stream, "events": 0,
                               "batches": 0, "bytes": 0, "seconds": 0.0, "rate": 0.0,
                               "stopped": False, "run": None}
    start = time.monotonic()

    def update() -> dict[str, Any]:
        elapsed = time.monotonic() - start
        summary["seconds"] = round(elapsed, 3)
        summary["rate"] = round(summary["events"] / elapsed, 2) if elapsed > 0 else 0.0
        return summary

    with client.producer(experiment, stream,
                         producer_id=producer_id or f"simulator-{uuid.uuid4().hex[:12]}",
                         retention_bytes=retention_bytes,
                         retention_seconds=retention_seconds) as producer:
        try:
            _send_paced(producer, sim, rate, events, batch_events, stop, summary,
                        lambda: progress(update()) if progress is not None else None,
                        progress_every)
            summary["stopped"] = stop.is_set()
        except KeyboardInterrupt:
            summary["stopped"] = True
        update()  # the rate of sending, not counting the wait for the last acks below
        if end_run:
            ended = producer.end_run(config=run_config(sim.tof_samples))
            summary["run"], summary["run_events"] = ended["run"], ended["events"]
        else:
            producer.close()
        if producer.last_ack is not None:
            summary["next_offset"] = producer.last_ack.offset + producer.last_ack.events
    return summary


def _send_paced(producer: Producer, sim: Simulator, rate: float, events: int | None,
                batch_events: int, stop: threading.Event, summary: dict[str, Any],
                report: Callable[[], None], report_every: float) -> None:
    """The sending loop of `produce`: sleep until each batch is due, stamp it, send it."""
    anchor, anchor_ns = time.monotonic(), time.time_ns()
    scheduled = 0  # events due since the anchor
    last_report = anchor
    while events is None or summary["events"] < events:
        n = batch_events if events is None else min(batch_events, events - summary["events"])
        due = anchor + (scheduled + n) / rate
        wait = due - time.monotonic()
        if (wait > 0 and stop.wait(wait)) or stop.is_set():
            return
        if wait < -MAX_LAG_S:  # far behind: a new schedule from now, not a burst
            anchor, anchor_ns, scheduled = time.monotonic(), time.time_ns(), -n
            due = anchor
        batch = sim.batch(n, anchor_ns + round((due - anchor) * 1e9))
        producer.send(batch)
        scheduled += n
        summary["events"] += n
        summary["batches"] += 1
        summary["bytes"] += batch.nbytes
        if time.monotonic() - last_report >= report_every:
            last_report = time.monotonic()
            report()
