"""NeXus/NXmx crystallography series as DECTRIS Eiger (and Jungfrau through the same writers)
write them.

A series is `<sample>_<N>_master.h5` with the NXmx metadata (beam, detector geometry, the pixel
mask under `detectorSpecific`, one goniometer angle per frame) and `/entry/data/data_000001 ...`
external links to `<sample>_<N>_data_000001.h5 ...`, each holding `frames_per_file` frames at
`/entry/data/data`, one chunk per frame, compressed with bitshuffle-LZ4 (HDF5 filter 32008) or
LZ4 (32004), with `image_nr_low`/`image_nr_high` attributes. Frames are photon counts: mostly
zeros, a solvent ring and Bragg spots; masked pixels (module gaps, dead pixels) hold the
detector's saturation value 2**bit_depth - 1, as the Eiger writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from . import physics as ph
from ._h5 import atomic_h5, check_counts

WAVELENGTH_A = 0.9793
DISTANCE_M = 0.15
PIXEL_SIZE_M = 75e-6
FRAME_TIME_S = 0.01
COUNT_TIME_S = 0.0099999
SENSOR_THICKNESS_M = 450e-6
OMEGA_START_DEG = 0.0
OMEGA_STEP_DEG = 0.1
GAP_EVERY = (64, 128)  # a module gap row/column this often (pixels), as on a multi-module Eiger
COMPRESSIONS = ("bslz4", "lz4", "none")
# Expected photons per pixel = PHOTONS_PER_UNIT x (BACKGROUND + RING x ring profile + spots):
# about 0.15 of background, a faint solvent ring, and tens of photons per Bragg spot.
PHOTONS_PER_UNIT = 0.03
BACKGROUND = 5.0
RING = 10.0


def series_prefix(directory: str | os.PathLike[str], sample: str, series: int) -> Path:
    return Path(directory) / f"{sample}_{series}"


def pixel_mask(frame_shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """DECTRIS mask bits: 1 = gap, 2 = dead, as in detectorSpecific/pixel_mask (uint32)."""
    h, w = frame_shape
    mask = np.zeros((h, w), dtype=np.uint32)
    mask[GAP_EVERY[0] - 1 :: GAP_EVERY[0], :] = 1
    mask[:, GAP_EVERY[1] - 1 :: GAP_EVERY[1]] = 1
    dead = rng.integers(0, h * w, max(1, h * w // 20000))
    mask.reshape(-1)[dead] |= 2
    return mask


def generate_nxmx_series(
    directory: str | os.PathLike[str],
    series: int,
    n_frames: int = 20,
    frames_per_file: int = 100,
    sample: str = "lysozyme",
    seed: int = 0,
    frame_shape: tuple[int, int] = (256, 256),
    dtype: str = "uint16",
    compression: str = "bslz4",
) -> Path:
    """Write a master file and its data files; returns the master file's path."""
    check_counts(n_frames=n_frames, frames_per_file=frames_per_file)
    if frames_per_file < 1:
        raise ValueError("frames_per_file must be at least 1")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError("dtype must be uint16 or uint32 (the Eiger's bit depths)")
    h, w = (int(v) for v in frame_shape)
    if min(h, w) < 4 * ph.SPOT_MARGIN:
        raise ValueError(f"frame_shape must be at least {4 * ph.SPOT_MARGIN} pixels a side")
    prefix = series_prefix(directory, sample, series)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    saturation = int(np.iinfo(dt).max)
    mask = pixel_mask((h, w), ph.stream(seed, series, "mask"))
    masked = mask != 0

    pulse = ph.pulse_energy_mj(ph.stream(seed, series, "flux"), n_frames, mean_mj=1.0)
    counts = ph.spot_counts(ph.stream(seed, series, "hits"), n_frames, 0.8, 5, 25.0, 60)
    spots = ph.draw_spots(ph.stream(seed, series, "spots"), counts, pulse, (h, w), 1.0)
    photons = ph.stream(seed, series, "photons")
    filters = _filter(compression)

    links = []
    for k, first in enumerate(range(0, n_frames, frames_per_file), start=1):
        last = min(first + frames_per_file, n_frames)
        name = f"{prefix.name}_data_{k:06d}.h5"
        with atomic_h5(prefix.parent / name) as f:
            data = f.create_group("entry/data")
            ds = data.create_dataset("data", shape=(last - first, h, w), dtype=dt,
                                     chunks=(1, h, w), **filters)
            ds.attrs["image_nr_low"] = np.int32(first + 1)
            ds.attrs["image_nr_high"] = np.int32(last)
            for i in range(first, last):
                mean = ph.render_frames(photons, (h, w), pulse[i : i + 1], spots, i,
                                        BACKGROUND, 0.0, RING)[0]
                frame = photons.poisson(np.clip(mean * PHOTONS_PER_UNIT, 0.0, None)).astype(dt)
                frame[masked] = saturation
                ds[i - first] = frame
        links.append((f"data_{k:06d}", name))

    with atomic_h5(prefix.parent / f"{prefix.name}_master.h5") as f:
        entry = _group(f, "entry", "NXentry")
        entry["definition"] = "NXmx"
        data = _group(entry, "data", "NXdata")
        for link, name in links:
            data[link] = h5py.ExternalLink(name, "/entry/data/data")
        instrument = _group(entry, "instrument", "NXinstrument")
        beam = _group(instrument, "beam", "NXbeam")
        _value(beam, "incident_wavelength", WAVELENGTH_A, "angstrom")
        det = _group(instrument, "detector", "NXdetector")
        det["description"] = "Dectris EIGER2 Si 4M (simulated)"
        _value(det, "detector_distance", DISTANCE_M, "m")
        _value(det, "beam_center_x", w / 2 + 0.5, "pixel")
        _value(det, "beam_center_y", h / 2 - 0.5, "pixel")
        _value(det, "x_pixel_size", PIXEL_SIZE_M, "m")
        _value(det, "y_pixel_size", PIXEL_SIZE_M, "m")
        _value(det, "count_time", COUNT_TIME_S, "s")
        _value(det, "frame_time", FRAME_TIME_S, "s")
        det["sensor_material"] = "Si"
        _value(det, "sensor_thickness", SENSOR_THICKNESS_M, "m")
        det["bit_depth_image"] = np.int32(dt.itemsize * 8)
        det["saturation_value"] = np.int32(min(saturation, 2**31 - 1))
        specific = det.create_group("detectorSpecific")
        specific["nimages"] = np.int64(n_frames)
        specific["ntrigger"] = np.int64(1)
        specific["data_collection_date"] = "2026-11-27T10:00:00.000+00:00"
        specific.create_dataset("pixel_mask", data=mask, compression="gzip")
        sample_group = _group(entry, "sample", "NXsample")
        gonio = _group(sample_group, "goniometer", "NXtransformations")
        omega = OMEGA_START_DEG + OMEGA_STEP_DEG * np.arange(n_frames)
        _value(gonio, "omega", omega, "deg")
        _value(gonio, "omega_range_average", OMEGA_STEP_DEG, "deg")
    return prefix.parent / f"{prefix.name}_master.h5"


def _filter(compression: str) -> dict:
    if compression == "bslz4":
        return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    if compression == "lz4":
        return dict(hdf5plugin.LZ4())
    return {}


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _value(parent: h5py.Group, name: str, value: float | np.ndarray, units: str) -> None:
    parent[name] = np.asarray(value, dtype=np.float64)
    parent[name].attrs["units"] = units
