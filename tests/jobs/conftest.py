"""Job tests: a data root with a small and a longer run, a server whose jobs run on an embedded
Dask cluster, tokens for other users, and waiting for a job to reach a state."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from flight_server.config import Settings
from flight_server.generator import generate_cxi_run, generate_lcls2_run, generate_nxmx_series
from flight_server.generator.xtc2 import generate_xtc2_run
from flight_server.security.assembly import minter_for
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import CXI_EXP, LCLS2_EXP, raw_client, start_server

SMALL_RUN, LONG_RUN, LONG_EVENTS = 7, 9, 1500  # the long run: ~60 tasks of 1 MiB
MX_EXP, MX_SERIES = "mx2026", 4  # an NXmx Eiger series: 30 frames in 3 data files
XTC_EXP, XTC_RUN = "mfx2026", 5  # a raw LCLS-II run (xtc2): 80 events in 3 streams


@pytest.fixture(scope="module")
def jobs_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobs-data")
    smalldata = root / LCLS2_EXP / "hdf5" / "smalldata"
    generate_lcls2_run(smalldata / f"{LCLS2_EXP}_Run{SMALL_RUN:04d}.h5", SMALL_RUN,
                       n_events=200, seed=7)
    generate_lcls2_run(smalldata / f"{LCLS2_EXP}_Run{LONG_RUN:04d}.h5", LONG_RUN,
                       n_events=LONG_EVENTS, seed=9, chunk_events=25)
    generate_cxi_run(root / CXI_EXP / "cxi" / "run_12.cxi", 12, n_events=40, seed=12)
    generate_nxmx_series(root / MX_EXP / "eiger", MX_SERIES, n_frames=30, frames_per_file=10)
    generate_xtc2_run(root / XTC_EXP / "xtc", XTC_EXP, XTC_RUN, 80, seed=5, frame_shape=(64, 64))
    return root


# Tasks of 1 MiB of source, batches of 64 KiB: even the small runs make several of each.
JOB_SETTINGS = {"job_partition_bytes": 1 << 20, "batch_bytes": 64 << 10,
                "first_batch_bytes": 16 << 10, "job_workers": 2}


@pytest.fixture(scope="module")
def jobs_server(jobs_data: Path) -> Iterator[LclstreamServer]:
    srv = start_server(jobs_data, **JOB_SETTINGS)
    yield srv
    srv.shutdown()


@pytest.fixture
def jobs_client(jobs_server: LclstreamServer) -> Iterator[flight.FlightClient]:
    c = raw_client(jobs_server.port)
    yield c
    c.close()


def token_for(subject: str, **grants: tuple[str, ...]) -> str:
    """A token of the session's issuer for another user: token_for("bob", read=("cxi*",))."""
    settings = Settings(state_dir=Path(os.environ["LCLSTREAM_STATE_DIR"]))
    return minter_for(settings).mint(subject, Grants(**grants), 3600)


def act(client: flight.FlightClient, name: str, body: dict | bytes) -> dict | list:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    results = list(client.do_action(flight.Action(name, raw)))
    return json.loads(results[0].body.to_pybytes())


def submit_body(stream: str, experiment: str = LCLS2_EXP, runs: tuple[int, ...] = (SMALL_RUN,),
                into: str = LCLS2_EXP, end_run: bool = True, key: str | None = None,
                **source) -> dict:
    """A submit body; `source` adds request fields (columns, events, filter, processing)."""
    body = {"v": 1, "source": {"v": 1, "experiment": experiment, "runs": list(runs), **source},
            "into": {"experiment": into, "stream": stream}, "end_run": end_run}
    if key is not None:
        body["key"] = key
    return body


def wait_for(client: flight.FlightClient, job: str, until=lambda s: s["state"] in
             ("completed", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    """The job's status once `until` holds for it (by default: once it has finished)."""
    deadline = time.monotonic() + timeout
    while True:
        status = act(client, "job", {"job": job})
        if until(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} did not get there in {timeout} s: {status}")
        time.sleep(0.05)
