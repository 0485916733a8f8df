"""Mirrors across `kill -9` of either site: both servers are real processes, killed with their
Dask workers while a mirror runs and started again on the same ports. A copied run resumes after
what the destination stream holds and is verified; a followed live stream is stored exactly
once, whatever the source group redelivers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from clients import connect
from flight_server.config import Settings
from flight_server.security.assembly import minter_for
from flight_server.security.grants import Grants
from tests.helpers import (
    LCLS2_EXP,
    LCLSTREAM,
    cli_env,
    events,
    free_port,
    indices,
    interrupt,
    wait_for_location,
    wait_until,
)
from tests.jobs.conftest import LONG_RUN

MIRROR_EXP = "tmox42619mirror"


class Site:
    """`lclstream serve` in a process of its own, with its state directory, on a fixed port."""

    def __init__(self, root: Path, state: Path | None = None) -> None:
        self.data, self.state = root / "data", state or root / "state"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port, self.log = free_port(), root / "server.log"
        self.env = cli_env(LCLSTREAM_JOBS_DATABASE=str(root / "jobs.sqlite"),
                           LCLSTREAM_STATE_DIR=str(self.state),
                           LCLSTREAM_BATCH_BYTES=str(64 << 10),
                           LCLSTREAM_LIVE_FSYNC_INTERVAL="0.02")
        self.proc: subprocess.Popen | None = None

    @property
    def location(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*LCLSTREAM, "serve", "--data", str(self.data), "--port", str(self.port),
             "--job-workers", "1"], stdout=subprocess.PIPE, stderr=self.log.open("a"),
            text=True, env=self.env)
        wait_for_location(self.proc)

    def kill(self) -> None:
        """SIGKILL, no shutdown: a crash; the embedded cluster's workers go with it."""
        family = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for child in family:
            child.kill()

    def stop(self) -> None:
        if self.proc is not None:
            interrupt(self.proc, timeout=30)

    def token(self, subject: str, **grants: tuple[str, ...]) -> str:
        return minter_for(Settings(state_dir=self.state)).mint(subject, Grants(**grants), 3600)


@pytest.fixture
def sites(jobs_data: Path, tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    a = Site(tmp_path / "a")
    shutil.copytree(jobs_data / LCLS2_EXP, a.data / LCLS2_EXP)
    b = Site(tmp_path / "b", state=Path(cli_env()["LCLSTREAM_STATE_DIR"]))
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def progress(b: Site, job_id: str) -> int:
    with connect(b.location) as at_b:
        return at_b.job(job_id).last["progress"]["events"]


def kill_both_mid_way(a: Site, b: Site, job_id: str, at_least: int) -> None:
    """Kill the source once the mirror has got somewhere, then the destination while it waits
    for the source; start both again."""
    wait_until(lambda: progress(b, job_id) >= at_least, timeout=120)
    a.kill()
    time.sleep(0.5)  # the destination's tasks notice: reconnecting, backing off
    b.kill()
    a.start()
    b.start()


@pytest.mark.slow  # four server starts, each with its Dask cluster: ~30 s
def test_a_run_mirror_survives_both_servers_killed(sites) -> None:
    a, b = sites
    reader = a.token("alice", read=(LCLS2_EXP,))
    with connect(b.location) as at_b:
        [job] = at_b.mirror(a.location, LCLS2_EXP, [LONG_RUN], into=MIRROR_EXP,
                            source_token=reader)
    kill_both_mid_way(a, b, job.id, 1)
    with connect(b.location) as at_b:
        status = at_b.job(job.id).wait(progress=False, timeout=180)
        states = [t["state"] for t in status["transitions"]]
        assert states == ["queued", "running", "queued", "running", "completed"], status
        assert status["transitions"][3]["reason"].startswith("resumed after")
        copied = at_b.read(MIRROR_EXP, status["run"])
    with connect(a.location, reader) as at_a:
        source = at_a.read(LCLS2_EXP, LONG_RUN)
    assert copied.drop_columns(["run"]).equals(source.drop_columns(["run"]))


@pytest.mark.slow  # four server starts: ~40 s
def test_a_live_mirror_stores_every_event_once_across_both_servers_killed(sites) -> None:
    a, b = sites
    daq = a.token("daq", write=(LCLS2_EXP,), read=(LCLS2_EXP,))
    batches = 80
    sent = threading.Event()

    def produce() -> None:  # at the source's pace, through its restart
        with connect(a.location, daq) as at_a:
            producer = at_a.producer(LCLS2_EXP, "daq", producer_id="daq", reconnect_for=120)
            for i in range(1, batches):
                producer.send(events(i * 10), seq=i + 1)
                time.sleep(0.05)
            producer.close()
        sent.set()

    with connect(b.location) as at_b:
        with connect(a.location, daq) as at_a, \
                at_a.producer(LCLS2_EXP, "daq", producer_id="daq") as first:
            first.send(events(0), seq=1)  # the stream exists before the mirror starts
        [job] = at_b.mirror(a.location, LCLS2_EXP, stream="daq", into=MIRROR_EXP,
                            source_token=a.token("alice", read=(LCLS2_EXP,)))
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    kill_both_mid_way(a, b, job.id, 150)
    producer.join(timeout=180)
    assert sent.is_set()
    with connect(a.location, daq) as at_a:
        ended = at_a.end_run(LCLS2_EXP, "daq")
    with connect(b.location) as at_b:
        status = at_b.job(job.id).wait(progress=False, timeout=120)
        mirrored = at_b.read(MIRROR_EXP, status["run"])
    assert ended["events"] == batches * 10
    assert indices(mirrored.to_batches()) == list(range(batches * 10))
