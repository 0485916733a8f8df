"""LCLS1 smalldata layout, as the LCLS1 smalldata_tools writer produces it.

Time is ``event_time`` (Unix seconds << 32 | ns) alongside the 360 Hz ``fiducials`` counter.
Every 120th shot is kicked by the BYKIK magnet (event code 162): no X-rays, a background shot.
Detector ROIs are small dense arrays per event; their definitions live under ``/UserDataCfg``.
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
)

START_UNIX = 1_550_000_000.0
ROI_SHAPE = (32, 32)
ROI_RANGES = np.array([[0, 1], [100, 132], [200, 232]], dtype=np.int64)
"""(panel, rows, columns) of ROI_0 on the Jungfrau 1M, half-open ranges."""
PHOTON_KEV = 8.0
BYKIK_PERIOD = 120


def _roi_pattern() -> np.ndarray:
    """Mean photons per pixel per mJ: diffuse scattering falling off away from the beam."""
    rows = ROI_RANGES[1, 0] + np.arange(ROI_SHAPE[0], dtype=np.float64)[:, None]
    cols = ROI_RANGES[2, 0] + np.arange(ROI_SHAPE[1], dtype=np.float64)[None, :]
    r = np.hypot(rows - 256.0, cols - 512.0)
    return 2.0 * np.exp(-r / 250.0)


def generate_lcls1_run(
    path: str | os.PathLike[str],
    run: int,
    n_events: int = 240,
    seed: int = 0,
    chunk_events: int = 5,
) -> Path:
    """Write one LCLS1 smalldata run (ebeam, gas detector, evr, Jungfrau ROI); return its path."""
    path = Path(path)
    check_counts(n_events=n_events, chunk_events=chunk_events)
    n = int(n_events)

    unix_ns = ph.event_unix_ns(START_UNIX + run * ph.RUN_SPACING_S, n)
    fid = ph.fiducials(ph.stream(seed, run, "fiducials"), n)
    kicked = (np.arange(n) % BYKIK_PERIOD) == BYKIK_PERIOD // 2
    pulse = ph.pulse_energy_mj(ph.stream(seed, run, "gas_detector"), n, mean_mj=2.5)
    dark = 0.01 + 0.005 * ph.stream(seed, run, "gas_detector/dark").standard_normal(n)
    pulse = np.where(kicked, dark, pulse)
    photon = ph.photon_energy_ev(ph.stream(seed, run, "ebeam/photon_energy"), n, 8000.0, 8.0)

    pattern = _roi_pattern()
    photon_rng = ph.stream(seed, run, "jungfrau1M/photons")
    noise_rng = ph.stream(seed, run, "jungfrau1M/noise")

    with atomic_h5(path) as f:
        write_events(f, "event_time", ph.pack_time(unix_ns), chunk_events)
        write_events(f, "fiducials", fid, chunk_events)
        write_events(f, "ebeam/photon_energy", photon, chunk_events, units="eV")
        write_events(f, "gas_detector/f_11_ENRC", pulse, chunk_events, units="mJ")
        write_events(f, "evr/code_140", (~kicked).astype(np.int32), chunk_events)
        write_events(f, "evr/code_162", kicked.astype(np.int32), chunk_events)
        roi = event_dataset(
            f, "jungfrau1M/ROI_0_area", n, ROI_SHAPE, np.float32, chunk_events, units="keV"
        )
        for a, b in block_ranges(n, block_size(pattern.size * 16, chunk_events)):
            photons = photon_rng.poisson(np.clip(pulse[a:b], 0.0, None)[:, None, None] * pattern)
            noise = ph.gaussian_noise(noise_rng, b - a, pattern.size, 0.3, 0.0)
            roi[a:b] = photons.astype(np.float32) * PHOTON_KEV + noise.reshape(b - a, *ROI_SHAPE)

        cfg = f.create_group("UserDataCfg")
        write_config(cfg, "jungfrau1M/ROI_0", ROI_RANGES, units="pixel")
        write_config(cfg, "jungfrau1M/detector_distance_mm", np.float64(120.0), units="mm")
        write_config(cfg, "jungfrau1M/pixel_size_um", np.float64(75.0), units="um")
        write_config(cfg, "jungfrau1M/photon_energy_keV", np.float64(PHOTON_KEV), units="keV")
    return path
