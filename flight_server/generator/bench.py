"""Large LCLS2-layout runs for throughput benchmarks.

Benchmarks need gigabytes on disk quickly, not fresh physics per shot: a handful of distinct
frames and waveforms are rendered once and written repeatedly in large slabs, so writing runs
at disk speed and memory stays at a few slabs whatever the file size.
"""

import math
import os
from pathlib import Path

import h5py
import numpy as np

from . import physics as ph
from ._h5 import atomic_h5, check_counts, event_dataset, write_events

DISTINCT = 8
SLAB_EVENTS = 64
RUN = 0
PEDESTAL_ADU = 100.0
NOISE_ADU = 4.0


def bench_events(target_bytes: int, frame_shape: tuple[int, int], tof_samples: int) -> int:
    """Events needed for a file of about ``target_bytes`` (at least one)."""
    h, w = frame_shape
    per_event = h * w * 2 + tof_samples * 4 + 8 + 8
    return max(1, round(target_bytes / per_event))


def _is_current(path: Path, attrs: dict[str, object]) -> bool:
    """True if ``path`` is a bench file written with exactly these parameters."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return all(np.array_equal(f.attrs.get(k), v) for k, v in attrs.items())
    except OSError:
        return False


def generate_bench_run(
    path: str | os.PathLike[str],
    target_bytes: int,
    seed: int = 0,
    frame_shape: tuple[int, int] = (512, 1024),
    tof_samples: int = 8192,
    chunk_events: int = 4,
) -> Path:
    """Write (or keep, if already there) a run of about ``target_bytes``: timestamp, gmd/energy,
    epix/image (uint16 frames) and tof/waveforms.
    """
    path = Path(path)
    check_counts(chunk_events=chunk_events, tof_samples=tof_samples)
    h, w = (int(v) for v in frame_shape)
    if min(h, w) < 4 * ph.SPOT_MARGIN:
        raise ValueError(f"frame_shape must be at least {4 * ph.SPOT_MARGIN} pixels a side")
    n = bench_events(target_bytes, (h, w), tof_samples)
    attrs = {
        "bench_n_events": n,
        "bench_seed": seed,
        "bench_frame_shape": np.array([h, w]),
        "bench_tof_samples": tof_samples,
        "bench_chunk_events": chunk_events,
    }
    if _is_current(path, attrs):
        return path

    unix_ns = ph.event_unix_ns(1_700_000_000.0, n)
    pulse = ph.pulse_energy_mj(ph.stream(seed, RUN, "gmd/energy"), n)

    # The distinct shots: a few hits among them so the frames are not all background.
    shot_pulse = pulse[:DISTINCT] if n >= DISTINCT else np.resize(pulse, DISTINCT)
    counts = np.where(np.arange(DISTINCT) % 3 == 0, 40, 0).astype(np.int64)
    spots = ph.draw_spots(ph.stream(seed, RUN, "epix/spots"), counts, shot_pulse, (h, w))
    noise_rng = ph.stream(seed, RUN, "epix/noise")
    frames = ph.to_uint16(
        ph.render_frames(noise_rng, (h, w), shot_pulse, spots, 0, PEDESTAL_ADU, NOISE_ADU, 6.0)
    )
    heights = ph.tof_heights(ph.stream(seed, RUN, "tof/heights"), shot_pulse, 1)
    waves = ph.tof_waveforms(
        ph.stream(seed, RUN, "tof/noise"), heights, ph.tof_profiles(tof_samples, 1)
    )[:, 0]

    # One slab holds whole chunks and whole cycles of the distinct shots, so it is the same
    # for every write: event i shows shot i % DISTINCT.
    period = math.lcm(chunk_events, DISTINCT)
    slab = period * max(1, SLAB_EVENTS // period)
    cycle = np.arange(slab) % DISTINCT
    frame_slab = frames[cycle]
    wave_slab = waves[cycle]
    del frames, waves

    with atomic_h5(path) as f:
        f.attrs.update(attrs)
        write_events(f, "timestamp", ph.pack_time(unix_ns, ph.UNIX_AT_1990), chunk_events)
        write_events(f, "gmd/energy", pulse, chunk_events, units="mJ")
        image = event_dataset(f, "epix/image", n, (h, w), np.uint16, chunk_events, "ADU")
        tof = event_dataset(f, "tof/waveforms", n, (tof_samples,), np.float32, chunk_events, "V")
        for a in range(0, n, slab):
            b = min(n, a + slab)
            image[a:b] = frame_slab[: b - a]
            tof[a:b] = wave_slab[: b - a]
    return path


SCALAR_CHUNK_EVENTS = 65536  # 512 KiB chunks of 8-byte values: read with one pread per chunk
SCALAR_MISSING_FRACTION = 0.01  # as in the smalldata runs: a few shots without a reading


def generate_scalar_run(
    path: str | os.PathLike[str],
    run: int,
    n_events: int,
    seed: int = 0,
    chunk_events: int = SCALAR_CHUNK_EVENTS,
    start_unix: float = 1_700_000_000.0,
) -> Path:
    """Write (or keep, if already there) an LCLS2 smalldata run of scalar per-event datasets
    only: timestamp, gmd/energy (1% missing, NaN), ebeam/photon_energy and evr/code_40
    (1% missing, -99999). Millions of events are written in seconds, for SQL aggregations.

    Runs are spaced far enough apart in time that long ones do not overlap.
    """
    path = Path(path)
    check_counts(n_events=n_events, chunk_events=chunk_events)
    n = int(n_events)
    attrs = {
        "bench_scalar_run": int(run),
        "bench_n_events": n,
        "bench_seed": seed,
        "bench_chunk_events": chunk_events,
        "bench_start_unix": float(start_unix),
    }
    if _is_current(path, attrs):
        return path

    run_seconds = ph.RUN_SPACING_S * (1 + n // (ph.EVENT_RATE_HZ * ph.RUN_SPACING_S))
    unix_ns = ph.event_unix_ns(start_unix + run * run_seconds, n)
    pulse = ph.pulse_energy_mj(ph.stream(seed, run, "gmd/energy"), n)
    gmd = ph.with_missing_float(pulse, ph.stream(seed, run, "gmd/missing"),
                                SCALAR_MISSING_FRACTION)
    del pulse
    photon = ph.photon_energy_ev(ph.stream(seed, run, "ebeam/photon_energy"), n, 9500.0, 10.0)
    laser = (np.arange(n) % 2 == 0).astype(np.int64)  # pump-probe: laser on every other shot
    code_40 = ph.with_missing_int(laser, ph.stream(seed, run, "evr/missing"),
                                  SCALAR_MISSING_FRACTION)

    with atomic_h5(path) as f:
        f.attrs.update(attrs)
        write_events(f, "timestamp", ph.pack_time(unix_ns, ph.UNIX_AT_1990), chunk_events)
        write_events(f, "gmd/energy", gmd, chunk_events, units="mJ")
        write_events(f, "ebeam/photon_energy", photon, chunk_events, units="eV")
        write_events(f, "evr/code_40", code_40, chunk_events)
    return path
