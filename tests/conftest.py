"""Shared fixtures: generated runs in every layout and a real Flight server on loopback.

Every test server runs with authentication on and shares one state directory, so one admin
token (exported as LCLSTREAM_TOKEN for the session) is valid on all of them, including servers
the CLI tests start as subprocesses. The keyring is a plaintext file in a temporary directory:
tests never touch the real user's keyring.

Plain helpers (the test experiments, start_server, raw_client, the CLI, ...) are in
tests/helpers.py; fixtures that one folder alone uses are in that folder's conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clients import Client, connect
from flight_server.config import Settings
from flight_server.generator import generate_cxi_run, generate_lcls1_run, generate_lcls2_run
from flight_server.security.assembly import minter_for
from flight_server.security.grants import ALL
from flight_server.server import LclstreamServer
from tests.cluster.postgres import Postgres
from tests.helpers import CXI_EXP, LCLS1_EXP, LCLS2_EXP, raw_client, start_server


@pytest.fixture(scope="session", autouse=True)
def credentials_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server state dir, an admin token for it, and a keyring of the session's own."""
    # In the environment rather than module state: CLI subprocesses read the same variables,
    # and tests.helpers (admin_token, start_server) reads them from there.
    state_dir = tmp_path_factory.mktemp("state")
    token = minter_for(Settings(state_dir=state_dir)).mint("tester", ALL, 24 * 3600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCLSTREAM_STATE_DIR", str(state_dir))
        mp.setenv("LCLSTREAM_TOKEN", token)
        mp.setenv("PYTHON_KEYRING_BACKEND", "keyrings.alt.file.PlaintextKeyring")
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield token


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    smalldata = root / LCLS2_EXP / "hdf5" / "smalldata"
    generate_lcls2_run(smalldata / f"{LCLS2_EXP}_Run0007.h5", 7, n_events=120, seed=7)
    generate_lcls2_run(smalldata / f"{LCLS2_EXP}_Run0008.h5", 8, n_events=90, seed=8)
    generate_lcls1_run(root / LCLS1_EXP / "r0003.h5", 3, n_events=80, seed=3)
    generate_cxi_run(root / CXI_EXP / "cxi" / "run_12.cxi", 12, n_events=40, seed=12)
    return root


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
    c = raw_client(location)
    yield c
    c.close()


@pytest.fixture
def sign(server: LclstreamServer):
    """Seal a hand-written ticket as the server would, to test what lies behind the seal."""
    return server.security.seal.sign


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL of the module's own (tests/cluster/postgres.py): the cluster's state;
    `postgres.database()` gives a test a database of its own."""
    pg = Postgres().init()
    yield pg
    pg.remove()
