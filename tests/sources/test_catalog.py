"""Run discovery under the data root: file names, depth, and changes without a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.flight as flight
import pytest

from flight_server.catalog import run_number
from tests.helpers import LCLS1_EXP, raw_client, start_server


@pytest.mark.parametrize("name, number", [
    ("tmox42619_Run0007.h5", 7), ("r0007.h5", 7), ("run_7.cxi", 7), ("RUN12.hdf5", 12),
    ("xpp_run-0042.h5", 42), ("run0.h5", 0),
    ("notes.txt", None), ("calib.h5", None), ("run_7.h5.tmp", None), ("r0007.h5.part", None),
])
def test_run_numbers_from_file_names(name, number) -> None:
    assert run_number(name) == number


def test_runs_appear_and_disappear_without_restart(tmp_path: Path, data_root: Path) -> None:
    src = data_root / LCLS1_EXP / "r0003.h5"
    deep = tmp_path / "exp1" / "hdf5" / "smalldata"
    deep.mkdir(parents=True)
    srv = start_server(tmp_path)
    try:
        c = raw_client(srv.port)
        assert list(c.list_flights()) == []
        shutil.copy(src, deep / "exp1_Run0004.h5")
        assert [i.descriptor.path for i in c.list_flights()] == [[b"exp1", b"4"]]
        (tmp_path / "exp2").mkdir()
        shutil.copy(src, tmp_path / "exp2" / "run_9.h5")
        assert len(list(c.list_flights())) == 2
        (deep / "exp1_Run0004.h5").unlink()
        assert [i.descriptor.path for i in c.list_flights()] == [[b"exp2", b"9"]]
        with pytest.raises(KeyError, match="has no run 4"):
            c.get_flight_info(flight.FlightDescriptor.for_path("exp1", "4"))
        # a file replaced in place is described afresh (its event count changed)
        from flight_server.generator import generate_lcls1_run
        generate_lcls1_run(tmp_path / "exp2" / "run_9.h5", 9, n_events=33)
        info = c.get_flight_info(flight.FlightDescriptor.for_path("exp2", "9"))
        assert info.total_records == 33
        c.close()
    finally:
        srv.shutdown()
