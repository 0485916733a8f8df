"""LCLS-II raw runs (xtc2), written by psana's own `dgramCreate` in the layout the DAQ leaves:
``<exp>/xtc/<exp>-r<RUN:04d>-s<STREAM:03d>-c<CHUNK:03d>.xtc2`` and, beside them,
``xtc/smalldata/*.smd.xtc2`` made by psana's ``smdwriter`` (the event offsets psana's event
builder reads).

One stream file per DAQ node, as at the facility:

* ``s000``: ``pnccd`` (psana's ``pnccd_raw_1_2_3`` interface: ``calib``, uint16 frames with
  Bragg spots; ``photon_energy``) and ``hexanode`` (``hexanode_raw_0_0_1``: ``waveforms``,
  int16, of which the interface returns channels 2..6; ``times``). The pnccd misses a few
  events, as a detector that drops frames does;
* ``s001``: ``gmd`` beam-line data (``gmd_raw_2_0_0``: ``energy`` in mJ, ``xpos``), absent
  from the events it dropped;
* ``s002``: EPICS PVs, recorded in the SlowUpdate transitions (about once a second).

The shots are those `generate_lcls2_run` draws for the same run, seed and frame shape (pulse
energies, time stamps, the pnccd frames, the gmd's missing readings), so an HDF5 run written
beside it is this raw run's smalldata reduction, as at the facility.

Every stream carries every transition (Configure, BeginRun, BeginStep, Enable, SlowUpdates,
Disable, EndStep, EndRun); L1Accepts carry the events. Time stamps are psana's:
``(seconds since 1990) << 32 | nanoseconds``. psana is needed to write runs (``[psana]`` extra).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flight_server.fsutil import atomic_file, fsync_path, publish

from . import physics as ph
from ._h5 import block_ranges, check_counts

# psana's transition ids (xtcdata/xtc/TransitionId.hh)
CONFIGURE, BEGIN_RUN, BEGIN_STEP, ENABLE, SLOW_UPDATE = 2, 4, 6, 8, 10
L1_ACCEPT, DISABLE, END_STEP, END_RUN = 12, 9, 7, 5

PEDESTAL_ADU = 100.0
NOISE_ADU = 4.0
RING_ADU_PER_MJ = 6.0
HIT_FRACTION = 0.3
PNCCD_DROP_FRACTION = 0.05
GMD_DROP_FRACTION = 0.01  # the shots the smalldata's gmd/energy has as missing
HEXANODE_CHANNELS = 8  # the interface returns channels 2..6
SLOW_UPDATE_EVENTS = ph.EVENT_RATE_HZ  # one SlowUpdate a second
# EPICS PVs: the name psana users call (`run.Detector("sample_x")`) -> the PV
EPICS_PVS = {"sample_x": "MFX:USR:MMS:17.RBV", "shutter_open": "MFX:SHT:01:OPEN"}


@dataclass(frozen=True)
class _Det:
    """One detector interface of a stream: names psana matches to its detector classes."""

    name: str
    dettype: str
    detid: str
    alg: str
    version: tuple[int, int, int]
    names_id: int


PNCCD = _Det("pnccd", "pnccd", "pnccd_0001", "raw", (1, 2, 3), 0)
HEXANODE = _Det("hexanode", "hexanode", "hexanode_0001", "raw", (0, 0, 1), 1)
GMD = _Det("gmd", "gmd", "gmd_0001", "raw", (2, 0, 0), 2)
EPICS = _Det("epics", "epics", "epics_0001", "raw", (2, 0, 0), 3)
EPICSINFO = _Det("epicsinfo", "epicsinfo", "epicsinfo_0001", "epicsinfo", (1, 0, 0), 4)
RUNINFO = _Det("runinfo", "runinfo", "", "runinfo", (0, 0, 1), 90)


def run_files(xtc_dir: Path, experiment: str, run: int, stream: int, chunk: int = 0) -> Path:
    return xtc_dir / f"{experiment}-r{run:04d}-s{stream:03d}-c{chunk:03d}.xtc2"


def smd_file(xtc_dir: Path, experiment: str, run: int, stream: int) -> Path:
    return xtc_dir / "smalldata" / f"{experiment}-r{run:04d}-s{stream:03d}-c000.smd.xtc2"


def smdwriter() -> Path:
    """psana's smalldata writer, shipped in its wheel beside the package."""
    import psana

    return Path(psana.__file__).resolve().parent.parent / "bin" / "smdwriter"


def generate_xtc2_run(
    xtc_dir: str | os.PathLike[str],
    experiment: str,
    run: int,
    n_events: int = 240,
    seed: int = 0,
    frame_shape: tuple[int, int] = (128, 128),
    waveform_samples: int = 256,
    chunk_events: int | None = None,
    start_unix: float = 1_700_000_000.0,
) -> list[Path]:
    """Write one raw run and return its stream files. `chunk_events`: start a new chunk file
    (c001, ...) every so many events, as the DAQ does for large runs; smalldata files are only
    written for unchunked runs (psana's smdwriter reads one file)."""
    xtc_dir = Path(xtc_dir)
    check_counts(n_events=n_events, waveform_samples=waveform_samples)
    h, w = (int(v) for v in frame_shape)
    if min(h, w) < 4 * ph.SPOT_MARGIN:
        raise ValueError(f"frame_shape must be at least {4 * ph.SPOT_MARGIN} pixels a side")
    n = int(n_events)
    unix_ns = ph.event_unix_ns(start_unix + run * ph.RUN_SPACING_S, n)
    stamps = ph.pack_time(unix_ns, ph.UNIX_AT_1990).astype(np.uint64)
    pulse = ph.pulse_energy_mj(ph.stream(seed, run, "gmd/energy"), n)
    pnccd_present = ~ph.missing_mask(n, ph.stream(seed, run, "pnccd/drop"), PNCCD_DROP_FRACTION)
    gmd_present = ~ph.missing_mask(n, ph.stream(seed, run, "gmd/missing"), GMD_DROP_FRACTION)
    photon = ph.photon_energy_ev(ph.stream(seed, run, "ebeam/photon_energy"), n, 9500.0, 10.0)
    xpos = ph.stream(seed, run, "gmd/xpos").normal(0.0, 0.05, n).astype(np.float32)
    counts = ph.spot_counts(ph.stream(seed, run, "pnccd/hits"), n, HIT_FRACTION, 5, 25.0, 80)
    spots = ph.draw_spots(ph.stream(seed, run, "pnccd/spots"), counts, pulse, (h, w))
    heights = ph.tof_heights(ph.stream(seed, run, "hexanode/heights"), pulse, HEXANODE_CHANNELS)
    profiles = ph.tof_profiles(waveform_samples, HEXANODE_CHANNELS)
    # each channel's sample times (ns), as the digitizer records them beside its waveform
    times = np.tile(np.arange(waveform_samples, dtype=np.float64) * ph.TOF_SAMPLE_PERIOD_NS,
                    (HEXANODE_CHANNELS, 1))
    frame_rng = ph.stream(seed, run, "pnccd/noise")
    tof_rng = ph.stream(seed, run, "hexanode/noise")
    slow = np.arange(0, n, SLOW_UPDATE_EVENTS)
    sample_x = np.cumsum(ph.stream(seed, run, "epics/sample_x").normal(0.0, 0.01, len(slow)))

    def s000(a: int, b: int) -> Iterator[dict[_Det, dict]]:
        frames = ph.to_uint16(ph.render_frames(frame_rng, (h, w), pulse[a:b], spots, a,
                                               PEDESTAL_ADU, NOISE_ADU, RING_ADU_PER_MJ))
        waves = np.rint(ph.tof_waveforms(tof_rng, heights[a:b], profiles) * 1000.0)
        waves = np.clip(waves, -32768, 32767).astype(np.int16)
        for k, i in enumerate(range(a, b)):
            event = {HEXANODE: {"waveforms": waves[k], "times": times}}
            if pnccd_present[i]:
                event[PNCCD] = {"calib": frames[k], "photon_energy": np.float64(photon[i])}
            yield event

    def s001(a: int, b: int) -> Iterator[dict[_Det, dict]]:
        for i in range(a, b):
            yield {GMD: {"energy": np.float64(pulse[i]), "xpos": xpos[i]}} if gmd_present[i] \
                else {}

    def epics(k: int) -> dict[str, object]:
        return {"sample_x": np.float64(sample_x[k]), "shutter_open": np.int32(k % 4 != 3)}

    per_event = h * w * 2 + HEXANODE_CHANNELS * waveform_samples * 2
    block = max(1, min(n, (16 << 20) // per_event))
    streams: list[tuple[list[_Det], Callable | None]] = [
        ([PNCCD, HEXANODE], s000), ([GMD], s001), ([EPICS, EPICSINFO], None)]
    written = []
    for number, (dets, events) in enumerate(streams):
        first = _first_values(dets, h, w, waveform_samples, times, epics(0))
        writer = _StreamWriter(xtc_dir, experiment, run, number, chunk_events)
        written += writer.write(dets, first, stamps, events, block, slow, epics)
    if chunk_events is None:
        for number in range(len(streams)):
            _write_smd(run_files(xtc_dir, experiment, run, number),
                       smd_file(xtc_dir, experiment, run, number))
    return written


def _first_values(dets: list[_Det], h: int, w: int, samples: int, times: np.ndarray,
                  epics: dict[str, object]) -> dict[_Det, dict]:
    """What the Configure transition declares (dgramCreate takes names and types from data)."""
    values = {
        PNCCD: {"calib": np.zeros((h, w), np.uint16), "photon_energy": np.float64(0)},
        HEXANODE: {"waveforms": np.zeros((HEXANODE_CHANNELS, samples), np.int16),
                   "times": times},
        GMD: {"energy": np.float64(0), "xpos": np.float32(0)},
        EPICS: epics,
        EPICSINFO: {"keys": "epicsname", **EPICS_PVS},
    }
    return {d: values[d] for d in dets}


class _StreamWriter:
    """One stream's chunk files, each written to `.tmp` and renamed into place when full."""

    def __init__(self, xtc_dir: Path, experiment: str, run: int, stream: int,
                 chunk_events: int | None) -> None:
        import psana.dgramCreate as dc

        self.dc = dc
        self.dgram = dc.CyDgram()
        self.xtc_dir, self.experiment, self.run, self.stream = xtc_dir, experiment, run, stream
        self.chunk_events = chunk_events
        self.chunk, self.in_chunk, self.paths = 0, 0, []
        xtc_dir.mkdir(parents=True, exist_ok=True)
        self.file = self._open()

    def _open(self):
        path = run_files(self.xtc_dir, self.experiment, self.run, self.stream, self.chunk)
        self.paths.append(path)
        self.closing = ExitStack()
        return self.closing.enter_context(atomic_file(path))

    def _close(self) -> None:
        self.closing.close()  # synced and renamed into place

    def _add(self, det: _Det, values: dict) -> None:
        dc = self.dc
        self.dgram.addDet(dc.nameinfo(det.name, det.dettype, det.detid, det.names_id),
                          dc.alg(det.alg, list(det.version)), values)

    def _put(self, stamp: int, transition: int, with_data: bool, configure: bool = False
             ) -> None:
        if configure:
            data = self.dgram.get(stamp, transition)  # the Names of every detector, once
        else:
            data = self.dgram.getSelect(stamp, transition, add_names=False,
                                        add_shapes_data=with_data)
        self.file.write(data)

    def write(self, dets: list[_Det], first: dict[_Det, dict], stamps: np.ndarray,
              events: Callable | None, block: int, slow: np.ndarray,
              epics: Callable[[int], dict]) -> list[Path]:
        try:
            return self._write(dets, first, stamps, events, block, slow, epics)
        except BaseException as exc:
            self.closing.__exit__(type(exc), exc, exc.__traceback__)  # the .tmp goes
            raise

    def _write(self, dets: list[_Det], first: dict[_Det, dict], stamps: np.ndarray,
               events: Callable | None, block: int, slow: np.ndarray,
               epics: Callable[[int], dict]) -> list[Path]:
        runinfo = {"expt": self.experiment, "runnum": self.run}
        t0 = int(stamps[0]) - 1000  # transitions before the first event, a microsecond apart
        for det in dets:
            self._add(det, first[det])
        self._add(RUNINFO, runinfo)
        self._put(t0 - 4, CONFIGURE, True, configure=True)
        self._add(RUNINFO, runinfo)
        self._put(t0 - 3, BEGIN_RUN, True)
        self._put(t0 - 2, BEGIN_STEP, False)
        self._put(t0 - 1, ENABLE, False)
        slow_at = {int(e): k for k, e in enumerate(slow)}
        n = len(stamps)
        for a, b in block_ranges(n, block) if events else [(0, n)]:
            produced = events(a, b) if events else iter([{}] * (b - a))
            for i, event in zip(range(a, b), produced, strict=True):
                if i in slow_at:  # just before its event: that event and later ones see it
                    if EPICS in dets:
                        self._add(EPICS, epics(slow_at[i]))
                    self._put(int(stamps[i]) - 1, SLOW_UPDATE, EPICS in dets)
                if event:
                    for det, values in event.items():
                        self._add(det, values)
                    self._put(int(stamps[i]), L1_ACCEPT, True)
                self.in_chunk += 1
                if self.chunk_events and self.in_chunk == self.chunk_events and i < n - 1:
                    self._close()
                    self.chunk, self.in_chunk = self.chunk + 1, 0
                    self.file = self._open()
        end = int(stamps[-1]) + 1000
        for k, transition in enumerate((DISABLE, END_STEP, END_RUN)):
            self._put(end + k, transition, False)
        self._close()
        return self.paths


def _write_smd(xtc: Path, smd: Path) -> None:
    smd.parent.mkdir(parents=True, exist_ok=True)
    tmp = smd.with_name(f".{smd.name}.tmp")
    try:
        subprocess.run([str(smdwriter()), "-f", str(xtc), "-o", str(tmp)], check=True,
                       stdout=subprocess.DEVNULL)
        fsync_path(tmp)
        publish(tmp, smd, exclusive=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
