"""The demo data root: a few LCLS2 runs of one experiment (the first also raw, in xtc2), CXI
runs of another, and an NXmx (DECTRIS Eiger) rotation series of a third.

Generation is idempotent so ``lclstream demo`` can be started repeatedly without rewriting
gigabytes: files are written atomically, so a file that exists is complete and is kept.
"""

import importlib.util
import logging
import os
from pathlib import Path

from . import physics as ph
from .cxi import generate_cxi_run
from .lcls2 import generate_lcls2_run
from .nxmx import generate_nxmx_series
from .xtc2 import generate_xtc2_run, smd_file

log = logging.getLogger(__name__)

CXI_EXPERIMENT = "cxilu9218"
CXI_RUN = 12  # the crystallography notebook's run
CXI_EVENTS = 240
# Every CXI run: number -> events. Numbered below CXI_RUN, so that a stream ended as a run of
# the experiment (which takes the next number after the highest) never takes one of theirs.
CXI_RUNS = {10: 300, 11: 180, CXI_RUN: CXI_EVENTS}
NXMX_EXPERIMENT = "mx31245"
NXMX_SERIES = 1  # lysozyme_1_master.h5: the crystallography notebook's Eiger series
NXMX_FRAMES = 180  # two data files of 100 and 80 frames, bitshuffle-LZ4
NXMX_SHAPE = (512, 512)
RAW_RUN = 1  # the LCLS2 run that is also served raw (source "xtc2"): its smalldata's shots


def demo_run_length(seed: int, run: int, events_per_run: int) -> int:
    """Run lengths vary a little, as real runs do, but the same way every time."""
    spread = min(300, events_per_run // 8)
    jitter = int(ph.stream(seed, run, "demo/run_length").integers(-spread, spread + 1))
    return max(1, events_per_run + jitter)


def lcls2_run_path(data_dir: Path, experiment: str, run: int) -> Path:
    """Where psana puts LCLS2 smalldata: ``<exp>/hdf5/smalldata/<exp>_Run<NNNN>.h5``."""
    return data_dir / experiment / "hdf5" / "smalldata" / f"{experiment}_Run{run:04d}.h5"


def generate_demo(
    data_dir: str | os.PathLike[str],
    experiment: str = "tmox42619",
    n_runs: int = 4,
    events_per_run: int = 2400,
    seed: int = 42,
) -> list[Path]:
    """Write the demo runs that are missing under ``data_dir`` and return all their paths."""
    data_dir = Path(data_dir)
    paths = []
    for run in range(1, n_runs + 1):
        path = lcls2_run_path(data_dir, experiment, run)
        if not path.exists():
            generate_lcls2_run(path, run, demo_run_length(seed, run, events_per_run), seed=seed)
        paths.append(path)
    paths += _raw_run(data_dir, experiment, demo_run_length(seed, RAW_RUN, events_per_run), seed)
    for run, events in CXI_RUNS.items():
        cxi = data_dir / CXI_EXPERIMENT / "cxi" / f"run_{run}.cxi"
        if not cxi.exists():
            generate_cxi_run(cxi, run, events, seed=seed)
        paths.append(cxi)
    eiger = data_dir / NXMX_EXPERIMENT / "eiger"
    master = eiger / f"lysozyme_{NXMX_SERIES}_master.h5"
    if not master.exists():  # written last, so it exists only once its data files do
        generate_nxmx_series(eiger, NXMX_SERIES, NXMX_FRAMES, frame_shape=NXMX_SHAPE, seed=seed)
    paths.append(master)
    return paths


def _raw_run(data_dir: Path, experiment: str, n_events: int, seed: int) -> list[Path]:
    """The raw (xtc2) form of run RAW_RUN, where psana is installed to write it."""
    if importlib.util.find_spec("psana") is None:
        log.warning("psana is not installed: the demo has no raw xtc2 run")
        return []
    xtc = data_dir / experiment / "xtc"
    last = smd_file(xtc, experiment, RAW_RUN, 2)  # written last: it exists once the run does
    if not last.exists():
        generate_xtc2_run(xtc, experiment, RAW_RUN, n_events, seed=seed)
    return sorted(xtc.glob(f"{experiment}-r{RAW_RUN:04d}-s*-c*.xtc2"))
