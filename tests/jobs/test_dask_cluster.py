"""Jobs on a Dask cluster of separate processes, as at a facility: a `dask scheduler` and
`dask worker`s started from the command line. A worker killed mid-job costs nothing: its tasks
run again on the other worker and the result holds every event exactly once, in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client as DaskClient

from clients import connect
from tests.helpers import LCLS2_EXP, free_port, interrupt, raw_client, start_server
from tests.jobs.conftest import JOB_SETTINGS, LONG_RUN, act, submit_body, wait_for

pytestmark = pytest.mark.slow  # starts a scheduler and two workers: ~10 s



def _dask(command: str, *args: str, log: Path) -> subprocess.Popen:
    module = {"scheduler": "distributed.cli.dask_scheduler",
              "worker": "distributed.cli.dask_worker"}[command]
    return subprocess.Popen([sys.executable, "-m", module, *args, "--no-dashboard"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler and two workers without nannies: a killed worker stays dead."""
    info, log = tmp_path / "scheduler.json", tmp_path / "dask.log"
    procs = [_dask("scheduler", "--port", "0", "--host", "127.0.0.1", "--scheduler-file",
                   str(info), log=log)]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        for _ in range(2):
            procs.append(_dask("worker", address, "--nthreads", "2", "--no-nanny",
                               "--host", "127.0.0.1", log=log))
        with DaskClient(address, timeout=30) as dc:
            dc.wait_for_workers(2, timeout=60)
        yield address, procs[1:]
    finally:
        for p in procs:
            interrupt(p, timeout=15)


def test_jobs_run_on_an_existing_cluster_and_survive_a_killed_worker(
        jobs_data: Path, tmp_path: Path, cluster) -> None:
    address, workers = cluster
    srv = start_server(jobs_data, dask_scheduler=address,
                       jobs_database=tmp_path / "jobs.sqlite", **JOB_SETTINGS)
    try:
        c = raw_client(srv.port)
        columns = ["gmd/energy", "pnccd/image"]
        job = act(c, "submit", submit_body("survivor", runs=(LONG_RUN,), columns=columns))["job"]
        wait_for(c, job, lambda s: s["state"] == "running" and s["progress"]["events"] > 0)
        os.kill(workers[0].pid, signal.SIGKILL)  # mid-job: its tasks are lost with it
        done = wait_for(c, job)
        assert done["state"] == "completed", done
        assert f"the Dask scheduler at {address}" in done["transitions"][1]["reason"]

        with connect(f"grpc://127.0.0.1:{srv.port}") as client:
            source = client.read(LCLS2_EXP, LONG_RUN, ["gmd/energy"])
            result = client.read(LCLS2_EXP, done["run"], ["gmd/energy"])
        assert workers[0].poll() is not None  # the worker did die
        np.testing.assert_array_equal(result.column("gmd/energy").to_numpy(),
                                      source.column("gmd/energy").to_numpy())
    finally:
        srv.shutdown()


def test_a_lost_scheduler_puts_running_jobs_back_in_the_queue(jobs_data: Path,
                                                              tmp_path: Path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = tmp_path / "dask.log"

    def start_cluster() -> list[subprocess.Popen]:
        procs = [_dask("scheduler", "--port", str(port), "--host", "127.0.0.1", log=log)]
        procs.append(_dask("worker", address, "--nthreads", "2", "--no-nanny", "--host",
                           "127.0.0.1", log=log))
        with DaskClient(address, timeout=30) as dc:
            dc.wait_for_workers(1, timeout=60)
        return procs

    procs = start_cluster()
    srv = start_server(jobs_data, dask_scheduler=address,
                       jobs_database=tmp_path / "jobs.sqlite", **JOB_SETTINGS)
    try:
        c = raw_client(srv.port)
        job = act(c, "submit", submit_body("orphan", runs=(LONG_RUN,),
                                           columns=["gmd/energy", "pnccd/image"]))["job"]
        wait_for(c, job, lambda s: s["state"] == "running" and s["progress"]["events"] > 0)
        for p in procs:  # the batch job's time is up
            p.kill()
            p.wait()
        wait_for(c, job, lambda s: s["state"] == "queued", timeout=60)
        procs = start_cluster()
        done = wait_for(c, job)
        assert done["state"] == "completed", done
        states = [t["state"] for t in done["transitions"]]
        assert states == ["queued", "running", "queued", "running", "completed"]
        with connect(f"grpc://127.0.0.1:{srv.port}") as client:
            source = client.read(LCLS2_EXP, LONG_RUN, ["gmd/energy"])
            result = client.read(LCLS2_EXP, done["run"], ["gmd/energy"])
        np.testing.assert_array_equal(result.column("gmd/energy").to_numpy(),
                                      source.column("gmd/energy").to_numpy())
    finally:
        srv.shutdown()
        for p in procs:
            p.kill()
            p.wait()
