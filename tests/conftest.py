"""Shared fixtures: generated runs in every layout and a real Flight server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from clients import Client, connect
from flight_server.config import Settings
from flight_server.generator import generate_cxi_run, generate_lcls1_run, generate_lcls2_run
from flight_server.server import LclstreamServer

LCLS2_EXP, LCLS1_EXP, CXI_EXP = "tmox42619", "xppd7114", "cxilu9218"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    smalldata = root / LCLS2_EXP / "hdf5" / "smalldata"
    generate_lcls2_run(smalldata / f"{LCLS2_EXP}_Run0007.h5", 7, n_events=120, seed=7)
    generate_lcls2_run(smalldata / f"{LCLS2_EXP}_Run0008.h5", 8, n_events=90, seed=8)
    generate_lcls1_run(root / LCLS1_EXP / "r0003.h5", 3, n_events=80, seed=3)
    generate_cxi_run(root / CXI_EXP / "cxi" / "run_12.cxi", 12, n_events=40, seed=12)
    return root


def start_server(data: Path, **overrides) -> LclstreamServer:
    settings = replace(Settings(data=data, port=0), **overrides)
    return LclstreamServer(settings)


@pytest.fixture(scope="session")
def server(data_root: Path) -> Iterator[LclstreamServer]:
    # Small batches and partitions so that the small test runs still span several of each.
    srv = start_server(data_root, batch_bytes=256 * 1024, first_batch_bytes=32 * 1024,
                       partition_bytes=1024 * 1024)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="session")
def location(server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


@pytest.fixture
def client(location: str) -> Iterator[Client]:
    with connect(location) as c:
        yield c


@pytest.fixture
def flight_client(location: str):
    import pyarrow.flight as flight

    c = flight.connect(location)
    yield c
    c.close()


def open_h5(path: Path):
    """Open a run file to check what the server sent. Without locking, as the server opens it:
    HDF5 refuses a second handle on a file with a different locking flag in one process."""
    import h5py

    return h5py.File(path, "r", locking=False)
