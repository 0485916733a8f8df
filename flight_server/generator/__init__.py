"""Deterministic synthetic experiment runs in the facilities' real HDF5 layouts.

The demo, the tests and the benchmarks all read files made here, so the service is exercised
on the same shapes, dtypes, chunking and quirks it meets at the facility. Same arguments and
seed give identical datasets; every file is written to ``<path>.tmp`` and renamed into place.

Layouts:

* LCLS2 smalldata (psana SmallData writer): ``/timestamp`` is seconds since 1990-01-01 UTC
  << 32 | ns; per-event datasets (``gmd/energy``, ``tof/waveforms``, ``pnccd/image`` ...) are
  chunked a few events at a time; ragged per-event arrays are flat ``var_NAME`` datasets with a
  per-event ``var_NAME_len``; missing floats are NaN, missing ints -99999; per-run
  configuration sits under ``/UserDataCfg`` with no event axis.
* LCLS1 smalldata (smalldata_tools): ``/event_time`` is Unix seconds << 32 | ns, with the
  360 Hz ``/fiducials`` counter; detector ROIs are small dense per-event arrays whose
  definitions live under ``/UserDataCfg``.
* CXI (Cheetah/psocake): float32 frames at ``/entry_1/instrument_1/detector_1/data``, one chunk
  per frame, soft-linked from ``/entry_1/data_1/data``; dense peak tables under
  ``/entry_1/result_1`` padded with zeros past ``nPeaks``; per-shot beam values under ``/LCLS``;
  per-run geometry as scalars.
* NXmx (DECTRIS Eiger): ``<sample>_<N>_master.h5`` with the NXmx metadata and external links
  to ``<sample>_<N>_data_000001.h5 ...``, frames compressed with bitshuffle-LZ4 or LZ4.
* LCLS-II raw runs (xtc2, not HDF5): ``<exp>/xtc/<exp>-r<RUN>-s<STREAM>-c<CHUNK>.xtc2`` stream
  files written by psana's own ``dgramCreate`` (see ``xtc2``; needs psana).
"""

from .bench import generate_bench_run
from .cxi import generate_cxi_run
from .demo import generate_demo
from .lcls1 import generate_lcls1_run
from .lcls2 import generate_lcls2_run
from .nxmx import generate_nxmx_series
from .xtc2 import generate_xtc2_run

__all__ = [
    "generate_bench_run",
    "generate_cxi_run",
    "generate_demo",
    "generate_lcls1_run",
    "generate_lcls2_run",
    "generate_nxmx_series",
    "generate_xtc2_run",
]
