"""A server killed with SIGKILL while jobs run, then started again: the interrupted job
resumes after the events its stream holds and completes with every event exactly once; the
queued job runs; a job being cancelled stays cancelled."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest

from clients import connect
from flight_server.jobs.store import LocalJobStore
from schemas.jobs import RUNNING, parse_submit
from tests.helpers import (
    LCLS2_EXP,
    LCLSTREAM,
    cli_env,
    interrupt,
    raw_client,
    start_server,
    wait_for_location,
)
from tests.jobs.conftest import LONG_RUN, SMALL_RUN, act, submit_body, wait_for


def serve(data: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(data), "--port", "0",
                             "--job-workers", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    return proc, wait_for_location(proc)


@pytest.mark.slow  # two server starts, each with its Dask cluster: ~15 s
def test_a_killed_server_resumes_its_jobs_exactly_once(jobs_data: Path, tmp_path: Path) -> None:
    env = cli_env(LCLSTREAM_JOBS_DATABASE=str(tmp_path / "jobs.sqlite"),
                  LCLSTREAM_JOB_PARTITION_BYTES=str(1 << 20), LCLSTREAM_JOBS_RUNNING="1",
                  LCLSTREAM_BATCH_BYTES=str(64 << 10))
    proc, location = serve(jobs_data, env)
    try:
        c = raw_client(location)
        columns = ["gmd/energy", "pnccd/image"]
        long = act(c, "submit", submit_body("resumed", runs=(LONG_RUN,), columns=columns))
        queued = act(c, "submit", submit_body("queued", runs=(SMALL_RUN,), columns=columns))
        wait_for(c, long["job"], lambda s: s["state"] == "running"
                 and s["progress"]["events"] > 0)
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # no shutdown: a crash
        proc.wait()
        for child in family:  # the embedded cluster's workers go with their server
            child.kill()
        c.close()

        proc, location = serve(jobs_data, env)
        c = raw_client(location)
        done = wait_for(c, long["job"])
        assert done["state"] == "completed", done
        states = [t["state"] for t in done["transitions"]]
        assert states == ["queued", "running", "queued", "running", "completed"]
        assert done["transitions"][2]["reason"].startswith("the server restarted")
        resumed = re.match(r"resumed after (\d+) of (\d+)", done["transitions"][3]["reason"])
        assert resumed and 0 < int(resumed[1]) < int(resumed[2])  # mid-way, not from the start
        assert wait_for(c, queued["job"])["state"] == "completed"

        with connect(location) as client:
            source = client.read(LCLS2_EXP, LONG_RUN, ["gmd/energy"])
            result = client.read(LCLS2_EXP, done["run"], ["gmd/energy"])
        np.testing.assert_array_equal(result.column("gmd/energy").to_numpy(),
                                      source.column("gmd/energy").to_numpy())
    finally:
        interrupt(proc, timeout=30)


def test_a_job_being_cancelled_when_the_server_stopped_stays_cancelled(
        jobs_data: Path, tmp_path: Path) -> None:
    database = tmp_path / "jobs.sqlite"
    store = LocalJobStore(database)
    spec = parse_submit(json.dumps(submit_body("gone")))
    job, _ = store.submit(("tester", "lclstream"), spec, limit=8)
    store.transition(job.id, RUNNING, "started")
    store.request_cancel(job.id, "alice")  # the server died before the job had stopped
    store.close()
    srv = start_server(jobs_data, jobs_database=database)
    try:
        status = act(raw_client(srv.port), "job", {"job": job.id})
        assert status["state"] == "cancelled"
        assert "being cancelled" in status["transitions"][-1]["reason"]
    finally:
        srv.shutdown()
