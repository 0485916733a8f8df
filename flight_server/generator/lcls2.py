"""LCLS2 smalldata layout, as psana's SmallData writer produces it.

Every per-event dataset has the event axis first and is chunked by a few events (the writer
appends batch by batch). Ragged per-event arrays are stored flat as ``var_NAME`` with a sibling
``var_NAME_len`` giving the entries per event. Missing float readings are NaN, missing integer
readings are -99999. Per-run configuration lives under ``/UserDataCfg`` without an event axis.
"""

import os
from pathlib import Path

import numpy as np

from . import physics as ph
from ._h5 import (
    atomic_h5,
    block_ranges,
    block_size,
    check_counts,
    event_dataset,
    write_config,
    write_events,
    write_ragged,
)

TOF_CHANNELS = 2
PEDESTAL_ADU = 100.0
NOISE_ADU = 4.0
RING_ADU_PER_MJ = 6.0
HIT_FRACTION = 0.3
MISSING_FRACTION = 0.01
MISSING_INT = -99999


def generate_lcls2_run(
    path: str | os.PathLike[str],
    run: int,
    n_events: int = 240,
    seed: int = 0,
    frame_shape: tuple[int, int] = (128, 128),
    tof_samples: int = 1024,
    chunk_events: int = 5,
    start_unix: float = 1_700_000_000.0,
) -> Path:
    """Write one LCLS2 smalldata run (gmd, ebeam, evr, tof, pnccd, peaks) and return its path.

    Frames and waveforms are generated and written a block of events at a time, so memory does
    not grow with the run length.
    """
    path = Path(path)
    check_counts(n_events=n_events, chunk_events=chunk_events, tof_samples=tof_samples)
    h, w = (int(v) for v in frame_shape)
    if min(h, w) < 4 * ph.SPOT_MARGIN:
        raise ValueError(f"frame_shape must be at least {4 * ph.SPOT_MARGIN} pixels a side")
    n = int(n_events)

    unix_ns = ph.event_unix_ns(start_unix + run * ph.RUN_SPACING_S, n)
    pulse = ph.pulse_energy_mj(ph.stream(seed, run, "gmd/energy"), n)
    gmd = ph.with_missing_float(pulse, ph.stream(seed, run, "gmd/missing"), MISSING_FRACTION)
    photon = ph.photon_energy_ev(ph.stream(seed, run, "ebeam/photon_energy"), n, 9500.0, 10.0)
    laser = (np.arange(n) % 2 == 0).astype(np.int64)  # pump-probe: laser on every other shot
    code_40 = ph.with_missing_int(laser, ph.stream(seed, run, "evr/missing"), MISSING_FRACTION)

    counts = ph.spot_counts(ph.stream(seed, run, "pnccd/hits"), n, HIT_FRACTION, 5, 25.0, 80)
    spots = ph.draw_spots(ph.stream(seed, run, "pnccd/spots"), counts, pulse, (h, w))
    heights = ph.tof_heights(ph.stream(seed, run, "tof/heights"), pulse, TOF_CHANNELS)
    profiles = ph.tof_profiles(tof_samples, TOF_CHANNELS)
    frame_rng = ph.stream(seed, run, "pnccd/noise")
    tof_rng = ph.stream(seed, run, "tof/noise")

    with atomic_h5(path) as f:
        write_events(f, "timestamp", ph.pack_time(unix_ns, ph.UNIX_AT_1990), chunk_events)
        write_events(f, "gmd/energy", gmd, chunk_events, units="mJ")
        write_events(f, "ebeam/photon_energy", photon, chunk_events, units="eV")
        write_events(f, "evr/code_40", code_40, chunk_events)
        tof = event_dataset(
            f, "tof/waveforms", n, (TOF_CHANNELS, tof_samples), np.float32, chunk_events, "V"
        )
        tof.attrs["species"] = ", ".join(s.name for s in ph.SPECIES)
        image = event_dataset(f, "pnccd/image", n, (1, h, w), np.uint16, chunk_events, "ADU")
        peaks = f.create_group("peaks")
        write_ragged(peaks, "var_x", spots.x, counts, chunk_events, units="pixel")
        write_ragged(peaks, "var_y", spots.y, counts, chunk_events, units="pixel")
        write_ragged(peaks, "var_intensity", spots.intensity, counts, chunk_events, units="ADU")

        per_event = h * w * 4 + TOF_CHANNELS * tof_samples * 4
        for a, b in block_ranges(n, block_size(per_event, chunk_events)):
            frames = ph.render_frames(
                frame_rng, (h, w), pulse[a:b], spots, a, PEDESTAL_ADU, NOISE_ADU, RING_ADU_PER_MJ
            )
            image[a:b] = ph.to_uint16(frames)[:, None]
            tof[a:b] = ph.tof_waveforms(tof_rng, heights[a:b], profiles)

        cfg = f.create_group("UserDataCfg")
        window = np.array([0.0, tof_samples * ph.TOF_SAMPLE_PERIOD_NS])
        write_config(cfg, "tof/window_ns", window, units="ns")
        write_config(cfg, "tof/sample_period_ns", ph.TOF_SAMPLE_PERIOD_NS, units="ns")
        write_config(cfg, "pnccd/pedestal_adu", PEDESTAL_ADU, units="ADU")
    return path
