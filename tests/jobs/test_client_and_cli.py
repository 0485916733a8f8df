"""`Client.submit` and `Job`, the `lclstream submit | jobs | job | cancel` commands, and a job
whose task fails on every retry."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from clients import JobFailed, connect
from flight_server.server import LclstreamServer
from tests.helpers import LCLS2_EXP, run_cli
from tests.jobs.conftest import LONG_RUN, SMALL_RUN, act, submit_body, wait_for


@pytest.fixture
def location(jobs_server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{jobs_server.port}"


def test_submit_wait_stream_and_read(location: str, capsys) -> None:
    with connect(location) as c:
        job = c.submit(LCLS2_EXP, SMALL_RUN, ["gmd/energy", "evr/code_40"],
                       filter="evr/code_40 = 1", into=(LCLS2_EXP, "client-1"))
        streamed = pa.Table.from_batches(list(job.stream()))  # ends when the run is made
        status = job.wait(progress=True)
        assert status["state"] == "completed" and status["run"] is not None
        assert "job " + job.id[:8] in capsys.readouterr().err  # the progress bar
        expected = c.read(LCLS2_EXP, SMALL_RUN, ["gmd/energy", "evr/code_40"],
                          filter="evr/code_40 = 1")
        assert streamed.select(expected.column_names).equals(expected)
        assert job.read(["gmd/energy", "evr/code_40"]).equals(expected)
        assert c.job(job.id).id == job.id and job.id in [j["job"] for j in c.jobs()]
        assert repr(job).endswith("completed: 200 of 200 events>")


def test_read_without_a_run_reads_the_stream(location: str) -> None:
    with connect(location) as c:
        job = c.submit(LCLS2_EXP, SMALL_RUN, ["gmd/energy"], events=slice(10, 60),
                       into=(LCLS2_EXP, "client-2"), end_run=False)
        got = job.read()
        assert job.last["run"] is None
        counted = c.sql(f'SELECT count(*) AS n FROM {LCLS2_EXP}."live/client-2"')
        assert counted.column("n").to_pylist() == [50]  # the job's stream is a SQL table
        assert got.column("gmd/energy").equals(
            c.read(LCLS2_EXP, SMALL_RUN, ["gmd/energy"], events=slice(10, 60))
            .column("gmd/energy"))


def test_a_cancelled_job_raises_when_waited_for(location: str) -> None:
    with connect(location) as c:
        job = c.submit(LCLS2_EXP, LONG_RUN, ["gmd/energy", "pnccd/image"],
                       into=(LCLS2_EXP, "client-3"), end_run=False)
        assert job.cancel()["state"] == "cancelled"
        with pytest.raises(JobFailed, match=f"job {job.id} cancelled: cancelled by tester"):
            job.wait(progress=False)


def test_the_command_line(location: str) -> None:
    done = run_cli("submit", LCLS2_EXP, str(SMALL_RUN), "--into", f"{LCLS2_EXP}/cli-1",
                   "-c", "gmd/energy", "--filter", "gmd/energy > 0.5", "--wait",
                   "--server", location)
    assert done.returncode == 0, done.stderr
    job = done.stdout.split()[1]
    assert f"job {job} completed" in done.stdout
    listed = run_cli("jobs", "--state", "completed", "--server", location)
    assert job in listed.stdout, listed.stderr
    described = run_cli("job", job, "--server", location)
    assert "completed" in described.stdout and "submitted" in described.stdout
    assert "became run" in described.stdout
    again = run_cli("cancel", job, "--server", location)
    assert again.returncode == 0 and "completed" in again.stdout  # finished: stays finished

    bad = run_cli("submit", LCLS2_EXP, "7", "--into", "no-slash", "--server", location)
    assert bad.returncode != 0 and "--into is EXPERIMENT/STREAM" in bad.stderr
    unknown = run_cli("job", "0" * 32, "--server", location)
    assert unknown.returncode != 0 and "no job" in unknown.stderr


def test_a_task_that_fails_on_every_retry_fails_the_job(jobs_server, jobs_data: Path,
                                                         jobs_client) -> None:
    # A run whose metadata reads but one compressed chunk of gmd/energy does not: planning
    # succeeds, the task reading that chunk fails each time it runs.
    experiment = "brokenexp"
    path = jobs_data / experiment / "hdf5" / "smalldata" / f"{experiment}_Run0001.h5"
    path.parent.mkdir(parents=True)
    shutil.copy(jobs_data / LCLS2_EXP / "hdf5" / "smalldata" /
                f"{LCLS2_EXP}_Run{SMALL_RUN:04d}.h5", path)
    with h5py.File(path, "a") as f:
        energy = f["gmd/energy"][...]
        del f["gmd/energy"]
        ds = f.create_dataset("gmd/energy", data=energy, chunks=(50,), compression="gzip")
        chunk = ds.id.get_chunk_info(2)
    with path.open("r+b") as fh:
        fh.seek(chunk.byte_offset)
        fh.write(np.full(chunk.size, 0xFF, np.uint8).tobytes())
    jobs_server.catalog.scan()

    job = act(jobs_client, "submit", submit_body("broken", experiment=experiment, runs=(1,),
                                                 into=experiment, columns=["gmd/energy"]))
    failed = wait_for(jobs_client, job["job"])
    assert failed["state"] == "failed", failed
    assert failed["transitions"][-1]["reason"] == "a task failed after its retries"
    assert failed["error"].startswith(f"RunUnreadable: run 1 of experiment '{experiment}'")
    assert "the file is truncated or corrupted" in failed["error"]
    assert act(jobs_client, "whoami", {})["subject"] == "tester"
