"""Run sources: one module per layout, each describing a run as a table (`run.Run`) and reading
event ranges of it as RecordBatches, and the read path that streams them (`streaming`: read-ahead
on the pool; `ranges`: event-range arithmetic).

- `hdf5`: one HDF5 file per run (LCLS2/LCLS1 smalldata, CXI; `layouts` tells them apart)
- `nxmx`: a NeXus/NXmx master file and its data files (DECTRIS Eiger, Jungfrau)
- `euxfel`: a European XFEL run directory of sequence files
- `xtc2`: an LCLS-II raw run, its stream and chunk files read through psana (`xtc2_index` finds
  the events in them)
"""

from pathlib import Path

from flight_server.sources import euxfel, hdf5, nxmx, xtc2
from flight_server.sources.layouts import LAYOUTS, Layout
from flight_server.sources.run import Reader, Run

KINDS = {"hdf5": hdf5.describe, "nxmx": nxmx.describe, "euxfel": euxfel.describe,
         "xtc2": xtc2.describe}


def describe(path: Path, experiment: str, number: int, kind: str = "hdf5",
             within: Path | None = None, psana_calibration: bool = False) -> Run:
    """Describe the run at `path` (a file, or a directory for European XFEL). Files the run
    refers to (NXmx external links) are only opened inside `within`, the experiment's tree
    (default: the run's own directory). `psana_calibration`: xtc2 runs fetch their detectors'
    calibration constants from the LCLS calibration database."""
    if kind == "xtc2":
        return xtc2.describe(path, experiment, number, within or path.parent, psana_calibration)
    return KINDS[kind](path, experiment, number, within or path.parent)


__all__ = ["KINDS", "LAYOUTS", "Layout", "Reader", "Run", "describe"]
