"""Fixtures of the processing tests: whole test runs read directly, no server."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tests.helpers import CXI_EXP, LCLS2_EXP, read_run


@pytest.fixture(scope="module")
def lcls2(data_root: Path) -> pa.RecordBatch:
    """Run 7: uint16 pnccd frames [1,128,128], float32 tof waveforms [2,1024] (ion peaks on a
    5 mV baseline), gmd with nulls."""
    return read_run(data_root, LCLS2_EXP, 7)


@pytest.fixture(scope="module")
def cxi(data_root: Path) -> pa.RecordBatch:
    """Run 12: float32 2-D frames [128,128] and fixed_size_list<float>[64] peak tables."""
    return read_run(data_root, CXI_EXP, 12)
