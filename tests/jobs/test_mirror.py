"""Mirroring between two sites: two real servers on loopback, each with its own state directory
(its own keys, tokens and users) and data. Site A holds the runs and live streams; site B runs
mirror jobs on its Dask workers that copy A's runs (verified against A's digest) or follow A's
live streams, through a link that may drop, and with A's credentials sealed at B."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import Client, connect
from flight_server.config import Settings
from flight_server.generator import generate_lcls2_run
from flight_server.security.assembly import minter_for
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from schemas.digest import Digest
from tests.helpers import (
    LCLS2_EXP,
    events,
    free_port,
    indices,
    run_cli,
    start_server,
    wait_until,
)
from tests.jobs.conftest import JOB_SETTINGS, LONG_EVENTS, LONG_RUN, SMALL_RUN, act, wait_for
from tests.wire import CountingRelay

MIRROR_EXP = "tmox42619mirror"  # the experiment at site B the copies become runs of


@dataclass
class Site:
    server: LclstreamServer
    state: Path
    data: Path

    @property
    def location(self) -> str:
        return f"grpc://127.0.0.1:{self.server.port}"

    def token(self, subject: str, ttl: int = 3600, **grants: tuple[str, ...]) -> str:
        """A token this site issues (another site does not accept it)."""
        return minter_for(Settings(state_dir=self.state)).mint(subject, Grants(**grants), ttl)


def start_site(root: Path, **settings) -> Site:
    state, data = root / "state", root / "data"
    data.mkdir(parents=True, exist_ok=True)
    server = start_server(data, state_dir=state, jobs_database=state / "jobs.sqlite",
                          **{**JOB_SETTINGS, **settings})
    return Site(server, state, data)


@pytest.fixture(scope="module")
def site_a(jobs_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The source site: the job tests' runs, its own keys."""
    root = tmp_path_factory.mktemp("site-a")
    shutil.copytree(jobs_data / LCLS2_EXP, root / "data" / LCLS2_EXP)
    site = start_site(root)
    yield site
    site.server.shutdown()


@pytest.fixture(scope="module")
def site_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The destination site: the session's keys (its admin token), no data of its own."""
    root = tmp_path_factory.mktemp("site-b")
    (root / "data").mkdir()
    server = start_server(root / "data", jobs_database=root / "jobs.sqlite", **JOB_SETTINGS)
    yield Site(server, Path(os.environ["LCLSTREAM_STATE_DIR"]), root / "data")
    server.shutdown()


@pytest.fixture
def at_b(site_b: Site) -> Iterator[Client]:
    with connect(site_b.location) as client:
        yield client


def alice_at(site: Site) -> str:
    return site.token("alice", read=(LCLS2_EXP,))


def same_table(ours: pa.Table, theirs: pa.Table, run: int) -> None:
    """Every column equal, but the run number: the copy's where the source's was taken."""
    assert ours.num_rows == theirs.num_rows
    assert ours.schema.names == theirs.schema.names
    assert set(ours.column("run").to_pylist()) == {run}
    for name in theirs.schema.names:
        if name == "run":
            continue
        assert ours.column(name).type == theirs.column(name).type, name
        assert ours.column(name).combine_chunks().equals(theirs.column(name).combine_chunks()), \
            name


def test_a_mirrored_run_equals_the_source_and_keeps_its_number(site_a, site_b, at_b) -> None:
    token = alice_at(site_a)
    [job] = at_b.mirror(site_a.location, LCLS2_EXP, [SMALL_RUN], into=MIRROR_EXP,
                        source_token=token)
    status = job.wait(progress=False)
    assert status["run"] == SMALL_RUN and status["from"] == site_a.location
    assert "digest equals the source's" in status["transitions"][-1]["reason"]
    with connect(site_a.location, token) as at_a:
        theirs = at_a.read(LCLS2_EXP, SMALL_RUN)
    same_table(at_b.read(MIRROR_EXP, SMALL_RUN), theirs, SMALL_RUN)


def test_the_source_token_is_sealed_while_the_job_runs_and_dropped_after(site_a, site_b,
                                                                            at_b) -> None:
    token = alice_at(site_a)
    [job] = at_b.mirror(site_a.location, LCLS2_EXP, [LONG_RUN], into=MIRROR_EXP,
                        source_token=token)
    table = site_b.server.settings.jobs_path()
    with sqlite3.connect(table) as db:
        [(sealed,)] = db.execute("SELECT credentials FROM jobs WHERE id = ?", (job.id,))
    assert sealed and token.encode() not in sealed and token not in str(job.last)
    job.wait(progress=False)
    with sqlite3.connect(table) as db:
        [(dropped,)] = db.execute("SELECT credentials FROM jobs WHERE id = ?", (job.id,))
    assert dropped is None
    for path in table.parent.glob(table.name + "*"):  # the table, its WAL: nowhere in clear
        assert token.encode() not in path.read_bytes()


@pytest.mark.parametrize("source, token, status", [
    ("unreachable", "alice", "FlightUnavailableError"),
    ("a", "another site's", "FlightUnauthenticatedError"),
    ("a", "no read", "FlightUnauthorizedError"),
    ("a", "expired", "FlightUnauthenticatedError"),
])
def test_a_source_that_refuses_fails_the_job_with_its_status(site_a, site_b, at_b, source,
                                                             token, status) -> None:
    location = site_a.location if source == "a" else f"grpc://127.0.0.1:{free_port()}"
    tokens = {"alice": alice_at(site_a),
              "another site's": site_b.token("alice", read=(LCLS2_EXP,)),
              "no read": site_a.token("alice", read=("other*",)),
              "expired": site_a.token("alice", ttl=-60, read=(LCLS2_EXP,))}
    [job] = at_b.mirror(location, LCLS2_EXP, [SMALL_RUN], into=MIRROR_EXP,
                        source_token=tokens[token])
    done = wait_for(at_b._flight, job.id)
    assert done["state"] == "failed", done
    assert status in done["error"] and location in done["error"], done["error"]


def test_a_dropping_link_loses_and_duplicates_nothing(site_a, site_b, at_b) -> None:
    with connect(site_a.location, alice_at(site_a)) as at_a:
        theirs = at_a.read(LCLS2_EXP, LONG_RUN)
    with CountingRelay(site_a.server.port, cut_after=theirs.nbytes // 5) as relay:
        [job] = at_b.mirror(relay.location, LCLS2_EXP, [LONG_RUN], into=MIRROR_EXP,
                            source_token=alice_at(site_a))
        status = job.wait(progress=False)
        assert relay.cuts >= 3
    same_table(at_b.read(MIRROR_EXP, status["run"]), theirs, status["run"])


def test_a_source_run_that_changes_while_copied_fails_the_job(site_a, site_b, at_b) -> None:
    path = site_a.data / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0031.h5"
    generate_lcls2_run(path, 31, n_events=LONG_EVENTS, seed=31, chunk_events=25)

    def change() -> None:  # at the cut: the resumed transfer reads the new file
        fresh = path.with_suffix(".new")
        generate_lcls2_run(fresh, 31, n_events=LONG_EVENTS, seed=32, chunk_events=25)
        os.replace(fresh, path)

    with CountingRelay(site_a.server.port, cut_after=4 << 20, on_cut=change) as relay:
        [job] = at_b.mirror(relay.location, LCLS2_EXP, [31], into=MIRROR_EXP,
                            source_token=alice_at(site_a))
        done = wait_for(at_b._flight, job.id)
        assert relay.cuts >= 1
    assert done["state"] == "failed" and "the copy differs from the source" in done["error"]
    assert done["run"] is None  # not served as a run
    assert 31 not in at_b.runs(MIRROR_EXP)["run"].to_list()


def test_the_digest_action_is_what_doget_sends(site_a) -> None:
    token = alice_at(site_a)
    with connect(site_a.location, token) as at_a:
        request = at_a.request(LCLS2_EXP, SMALL_RUN)
        info = at_a.plan(LCLS2_EXP, SMALL_RUN)
        summed = Digest(info.schema)
        for batch in at_a.batches(info):
            summed.update(batch)
        answer = act(at_a._flight, "digest", request.to_json())
    assert answer == summed.result().to_json()
    assert answer["events"] == info.total_records


@pytest.mark.parametrize("body, phrase", [
    ({"from": {"location": "http://elsewhere"}}, "from/location"),
    ({"from": {"location": "grpc://a:1", "extra": 1}}, "Additional properties"),
    ({"from": {"location": "grpc://a:1", "token": ""}}, "from/token"),
    ({"source": {"v": 1, "experiment": LCLS2_EXP, "stream": "daq"}, "from": None},
     "only for a mirror"),
    ({"source": {"v": 1, "experiment": LCLS2_EXP, "stream": "daq", "group": "g",
                 "member": "m"}}, "group of its own"),
])
def test_malformed_mirror_submits_are_refused(site_b, at_b, body, phrase) -> None:
    submit = {"v": 1, "source": {"v": 1, "experiment": LCLS2_EXP, "runs": [SMALL_RUN]},
              "from": {"location": "grpc://127.0.0.1:1"},
              "into": {"experiment": MIRROR_EXP, "stream": "bad"}, **body}
    if submit["from"] is None:
        del submit["from"]
    before = act(at_b._flight, "jobs", {"limit": 1000})
    with pytest.raises(pa.ArrowInvalid, match=phrase):
        act(at_b._flight, "submit", submit)
    assert act(at_b._flight, "jobs", {"limit": 1000}) == before


def test_mirroring_needs_write_on_into(site_a, site_b) -> None:
    reader = site_b.token("bob", read=("*",))
    with connect(site_b.location, reader) as at_b, pytest.raises(flight.FlightUnauthorizedError):
        at_b.mirror(site_a.location, LCLS2_EXP, [SMALL_RUN], into=MIRROR_EXP,
                    source_token=alice_at(site_a))


# -- live streams ---------------------------------------------------------------------------------

def group_of(at_a: Client, stream: str, job_id: str) -> dict | None:
    listed = next((s for s in at_a.streams(LCLS2_EXP) if s["stream"] == stream), None)
    if listed is None:
        return None
    return next((g for g in listed["groups"] if g["group"] == f"mirror-{job_id}"), None)


def test_a_live_stream_is_followed_as_a_group_and_becomes_a_run_when_it_ends(site_a, at_b
                                                                            ) -> None:
    with connect(site_a.location, site_a.token("daq", read=(LCLS2_EXP,),
                                               write=(LCLS2_EXP,))) as at_a:
        producer = at_a.producer(LCLS2_EXP, "daq-1")
        for i in range(5):
            producer.send(events(i * 10))
        producer.flush()
        [job] = at_b.mirror(site_a.location, LCLS2_EXP, stream="daq-1", into=MIRROR_EXP,
                            source_token=alice_at(site_a))
        assert job.into == (MIRROR_EXP, "daq-1")
        # the mirror is a consumer group at the source, committed as far as it has stored
        group = wait_until(lambda: (g := group_of(at_a, "daq-1", job.id)) and
                           g["committed"] == 50 and g)
        assert group["members"] == 1 and group["lag"] == 0
        for i in range(5, 12):
            producer.send(events(i * 10))
        ended = producer.end_run()
    status = job.wait(progress=False)
    assert status["state"] == "completed" and status["progress"]["events"] == 120
    assert "the source stream ended at offset 120" in status["transitions"][-1]["reason"]
    mirrored = at_b.read(MIRROR_EXP, status["run"])
    assert indices(mirrored.to_batches()) == list(range(120))
    with connect(site_a.location, alice_at(site_a)) as at_a:
        source = at_a.read(LCLS2_EXP, ended["run"], mirrored.schema.names[1:])
    assert source.select(mirrored.schema.names[1:]).equals(
        mirrored.select(mirrored.schema.names[1:]))


def test_cancelling_a_live_mirror_stops_following_an_idle_stream(site_a, at_b) -> None:
    with connect(site_a.location, site_a.token("daq", read=(LCLS2_EXP,),
                                               write=(LCLS2_EXP,))) as at_a:
        with at_a.producer(LCLS2_EXP, "idle") as producer:
            producer.send(events(0))
        [job] = at_b.mirror(site_a.location, LCLS2_EXP, stream="idle", into=MIRROR_EXP,
                            source_token=alice_at(site_a))
        wait_until(lambda: (g := group_of(at_a, "idle", job.id)) and g["members"] == 1)
        assert job.cancel()["state"] == "cancelled"
        # the follower notices, though nothing arrives, and leaves the source's group
        wait_until(lambda: group_of(at_a, "idle", job.id)["members"] == 0, timeout=30)


def test_a_live_mirror_of_a_stream_that_does_not_exist_fails(site_a, at_b) -> None:
    [job] = at_b.mirror(site_a.location, LCLS2_EXP, stream="nosuch", into=MIRROR_EXP,
                        source_token=alice_at(site_a))
    done = wait_for(at_b._flight, job.id)
    assert done["state"] == "failed", done
    assert f"the source {site_a.location}: ArrowKeyError" in done["error"], done
    assert "no live stream 'nosuch'" in done["error"]


def test_a_live_mirror_through_a_dropping_link_stores_every_event_once(site_a, at_b) -> None:
    with connect(site_a.location, site_a.token("daq", read=(LCLS2_EXP,),
                                               write=(LCLS2_EXP,))) as at_a:
        with at_a.producer(LCLS2_EXP, "flaky") as producer:
            for i in range(40):
                producer.send(events(i * 10, width=512))
        with CountingRelay(site_a.server.port, cut_after=600 << 10) as relay:
            [job] = at_b.mirror(relay.location, LCLS2_EXP, stream="flaky", into=MIRROR_EXP,
                                source_token=alice_at(site_a))
            wait_until(lambda: (g := group_of(at_a, "flaky", job.id)) and g["committed"] == 400)
            at_a.end_run(LCLS2_EXP, "flaky")
            status = job.wait(progress=False)
            assert relay.cuts >= 2
    assert indices(at_b.read(MIRROR_EXP, status["run"]).to_batches()) == list(range(400))


def test_the_command_line_narrows_your_token_for_the_source(jobs_server, site_a,
                                                            caplog) -> None:
    """`lclstream mirror` into site A from a server that issued your token: the job is handed
    a token narrowed there to reading the one experiment."""
    source = f"grpc://127.0.0.1:{jobs_server.port}"
    admin_at_a = site_a.token("operator", admin=("*",))
    caplog.set_level(logging.INFO, logger="lclstream.audit")
    done = run_cli("mirror", source, LCLS2_EXP, str(SMALL_RUN), "--into", MIRROR_EXP,
                   "--server", site_a.location, "--token", admin_at_a, "--wait", "--key", "cli")
    assert done.returncode == 0, done.stderr
    assert f"mirroring runs {SMALL_RUN} of {LCLS2_EXP} from {source}" in done.stdout
    assert "completed" in done.stdout and f"run {SMALL_RUN}" in done.stdout
    with connect(site_a.location, admin_at_a) as at_a:
        [job] = [j for j in at_a.jobs() if j["into"]["stream"].endswith("-cli")]
    narrowed = [r.getMessage() for r in caplog.records if '"narrow_token"' in r.getMessage()]
    assert narrowed and '"outcome":"ok"' in narrowed[-1]
    assert f'"grants":"{Grants(read=(LCLS2_EXP,)).describe()}"' in narrowed[-1]
    assert job["state"] == "completed"
    again = run_cli("mirror", source, LCLS2_EXP, "nope", "--into", MIRROR_EXP,
                    "--server", site_a.location, "--token", admin_at_a)
    assert again.returncode != 0 and "or live/STREAM" in again.stderr


def test_a_mirror_jobs_token_reads_its_own_stream_only(site_a, site_b, at_b) -> None:
    [copied, job] = [at_b.mirror(site_a.location, LCLS2_EXP, [SMALL_RUN], into=MIRROR_EXP,
                                 source_token=alice_at(site_a), end_run=end_run)[0]
                     for end_run in (True, False)]
    run = copied.wait(progress=False)["run"]
    done = job.wait(progress=False)
    into = MIRROR_EXP, done["into"]["stream"]
    token = site_b.server.security.minter.mint(
        f"job:{job.id}", Grants(read=(MIRROR_EXP,), write=(MIRROR_EXP,)), 600, job=job.id)
    run_ticket = at_b.plan(MIRROR_EXP, run).endpoints[0].ticket
    with connect(site_b.location, token) as worker:
        assert worker.read_stream(*into).num_rows == done["progress"]["events_total"]
        with pytest.raises(flight.FlightUnauthorizedError, match="its own stream only"):
            worker._flight.do_get(run_ticket).read_all()  # a run of the experiment
        with pytest.raises(flight.FlightUnauthorizedError, match="its own stream only"):
            next(iter(worker.subscribe(MIRROR_EXP, "daq-1")))  # another stream there


def test_a_mirror_from_a_site_that_compresses(jobs_data, tmp_path, at_b) -> None:
    """Between real sites the source compresses (zstd, its default for any peer not on its
    own machine): the copy arrives compressed, batch markers and all, and is verified."""
    shutil.copytree(jobs_data / LCLS2_EXP, tmp_path / "data" / LCLS2_EXP)
    zstd_site = start_site(tmp_path, compression="zstd")
    try:
        token = zstd_site.token("alice", read=(LCLS2_EXP,))
        [job] = at_b.mirror(zstd_site.location, LCLS2_EXP, [SMALL_RUN], into=MIRROR_EXP,
                            source_token=token)
        status = job.wait(progress=False)
        with connect(zstd_site.location, token) as there:
            assert there.plan(LCLS2_EXP, SMALL_RUN).schema.metadata[b"lclstream.compression"] \
                == b"zstd"
            theirs = there.read(LCLS2_EXP, SMALL_RUN)
        same_table(at_b.read(MIRROR_EXP, status["run"]), theirs, status["run"])
    finally:
        zstd_site.server.shutdown()
