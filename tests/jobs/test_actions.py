"""The job actions end to end on a real server whose jobs run on an embedded Dask cluster:
results equal DoGet's, bad input is refused with nothing queued, owners and rights, cancel."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import Client, connect
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import CXI_EXP, LCLS2_EXP, free_port, raw_client, start_server
from tests.jobs.conftest import (
    LONG_RUN,
    MX_EXP,
    MX_SERIES,
    SMALL_RUN,
    XTC_EXP,
    XTC_RUN,
    act,
    submit_body,
    token_for,
    wait_for,
)

ROI = {"step": "roi", "column": "pnccd/image", "y": [0, 16], "x": [8, 40]}


@pytest.fixture
def client(jobs_server: LclstreamServer):
    with connect(f"grpc://127.0.0.1:{jobs_server.port}") as c:
        yield c


def message(exc: BaseException) -> str:
    return str(exc).split(". Detail:")[0]


# -- the result --------------------------------------------------------------------------------


def test_a_job_produces_what_doget_returns_and_becomes_a_run(jobs_client, client) -> None:
    shape = {"columns": ["gmd/energy", "pnccd/image"], "filter": "gmd/energy > 0.2",
             "processing": [ROI]}
    status = act(jobs_client, "submit", submit_body("roi-1", **shape))
    assert status["state"] == "queued" and status["new"] is True
    done = wait_for(jobs_client, status["job"])

    assert done["state"] == "completed" and done["error"] is None
    assert [t["state"] for t in done["transitions"]] == ["queued", "running", "completed"]
    assert "started on an embedded Dask LocalCluster" in done["transitions"][1]["reason"]
    assert f"became run {done['run']}" in done["transitions"][2]["reason"]
    assert done["progress"]["events"] == done["progress"]["events_total"] == 200
    assert done["progress"]["bytes"] > 0 and done["started"] and done["finished"]

    expected = client.read(LCLS2_EXP, SMALL_RUN, shape["columns"], filter=shape["filter"],
                           processing=shape["processing"])
    assert 0 < expected.num_rows < 200  # the filter kept some, not all
    streamed = client.read_stream(LCLS2_EXP, "roi-1")
    assert streamed.select(expected.column_names).equals(expected)  # every event, in order
    run = client.read(LCLS2_EXP, done["run"], expected.column_names)
    assert run.equals(expected)


def test_peak_finding_and_hits_are_kept_as_a_run(jobs_client, client) -> None:
    data = "entry_1/data_1/data"
    steps = [{"step": "peaks", "column": data, "snr": 5, "min_pixels": 2, "radius": 3},
             {"step": "hits", "column": f"{data}/n_peaks", "min": 3}]
    body = submit_body("hits-1", experiment=CXI_EXP, runs=(12,), into=CXI_EXP,
                       columns=["run", data], processing=steps)
    done = wait_for(jobs_client, act(jobs_client, "submit", body)["job"])
    assert done["state"] == "completed", done

    expected = client.read(CXI_EXP, 12, ["run", data], processing=steps)
    assert 0 < expected.num_rows < 40
    run = client.read(CXI_EXP, done["run"])
    for name in (f"{data}/peaks/x", f"{data}/peaks/intensity", f"{data}/n_peaks"):
        assert run.column(name).equals(expected.column(name)), name  # lists keep their names


def test_jobs_read_nxmx_frames_and_a_runs_other_table(jobs_client, client) -> None:
    frames = "entry/data/data"
    steps = [{"step": "threshold", "column": frames, "above": 65534},
             {"step": "peaks", "column": frames, "snr": 12, "min_pixels": 3}]
    body = submit_body("eiger-peaks", experiment=MX_EXP, runs=(MX_SERIES,), into=MX_EXP,
                       columns=["run", frames], processing=steps)
    done = wait_for(jobs_client, act(jobs_client, "submit", body)["job"])
    assert done["state"] == "completed", done
    expected = client.read(MX_EXP, MX_SERIES, ["run", frames], processing=steps)
    assert expected.num_rows == 30 and expected.column(f"{frames}/n_peaks").to_numpy().sum() > 0
    names = [n for n in expected.column_names if n != "run"]  # a run's `run` is its own number
    assert client.read(MX_EXP, done["run"]).select(names).equals(expected.select(names))

    mask = "entry/instrument/detector/detectorSpecific/pixel_mask"
    job = client.submit(MX_EXP, MX_SERIES, [mask], table="config", into=(MX_EXP, "eiger-mask"),
                        end_run=False)
    done = wait_for(jobs_client, job.id)
    assert done["state"] == "completed", done
    expected = client.read(MX_EXP, MX_SERIES, [mask], table="config")
    assert client.read_stream(MX_EXP, "eiger-mask").select([mask]).equals(expected)


def test_jobs_read_raw_xtc2_runs_through_psana(client) -> None:
    frames = "pnccd/raw/calib"
    steps = [{"step": "peaks", "column": frames, "snr": 6, "min_pixels": 2}]
    columns = ["gmd/raw/energy", "epics/sample_x", frames]
    job = client.submit(XTC_EXP, XTC_RUN, columns, source="xtc2", processing=steps,
                        filter="gmd/raw/energy > 1.2", into=(XTC_EXP, "raw-peaks"),
                        end_run=False)
    assert job.wait(timeout=120, progress=False)["state"] == "completed"
    expected = client.read(XTC_EXP, XTC_RUN, columns, source="xtc2", processing=steps,
                           filter="gmd/raw/energy > 1.2")
    assert 0 < expected.num_rows < 80
    assert np.nansum(expected.column(f"{frames}/n_peaks").to_numpy()) > 0  # null: no frame
    streamed = client.read_stream(XTC_EXP, "raw-peaks")
    assert streamed.select(expected.column_names).equals(expected)


# -- bad input: refused, with nothing queued ---------------------------------------------------

BAD = [
    ("submit", b"{not json", "not valid JSON"),
    ("submit", b"[]", "must be a JSON object"),
    ("submit", {"v": 2, "source": {}, "into": {"experiment": "e", "stream": "s"}}, "at v"),
    ("submit", {**submit_body("x"), "priority": 9}, "priority"),
    ("submit", {k: v for k, v in submit_body("x").items() if k != "into"}, "into"),
    ("submit", {**submit_body("x"), "into": {"experiment": LCLS2_EXP}}, "stream"),
    ("submit", {**submit_body("x"), "end_run": "yes"}, "end_run"),
    ("submit", submit_body("../etc"), "invalid stream name"),
    ("submit", submit_body("x", into="../up"), "invalid experiment name"),
    ("submit", submit_body("x", events={"start": -1}), "start"),
    ("job", {"job": "../../etc/passwd"}, "job"),
    ("job", {}, "job"),
    ("job", {"job": "0" * 32, "also": 1}, "also"),
    ("cancel", b"", "JSON"),
    ("jobs", {"state": "sleeping"}, "state"),
    ("jobs", {"limit": 0}, "limit"),
    ("jobs", {"limit": True}, "limit"),
]


@pytest.mark.parametrize(("action", "body", "words"), BAD,
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_malformed_bodies_are_refused_and_nothing_is_queued(jobs_client, action, body,
                                                            words) -> None:
    before = act(jobs_client, "jobs", {"limit": 1000})
    with pytest.raises(pa.ArrowInvalid, match=words):
        act(jobs_client, action, body)
    assert act(jobs_client, "jobs", {"limit": 1000}) == before


SOURCES = [
    ({"experiment": "nosuchexp"}, pa.ArrowKeyError),
    ({"runs": (99,)}, pa.ArrowKeyError),
    ({"columns": ["gmd/energy", "no/such"]}, pa.ArrowKeyError),
    ({"processing": [{"step": "sharpen", "column": "pnccd/image"}]}, pa.ArrowInvalid),
    ({"filter": "gmd/energy >"}, pa.ArrowInvalid),
    ({"filter": "no/such > 1"}, pa.ArrowException),
    ({"events": {"start": 10_000}}, pa.ArrowInvalid),
]


@pytest.mark.parametrize(("source", "error"), SOURCES, ids=[str(s) for s, _ in SOURCES])
def test_a_source_is_validated_as_getflightinfo_validates_it(jobs_client, source, error) -> None:
    body = submit_body("never", **{k: v for k, v in source.items()
                                   if k not in ("experiment", "runs")},
                       experiment=source.get("experiment", LCLS2_EXP),
                       runs=source.get("runs", (SMALL_RUN,)))
    with pytest.raises(error) as planned:
        jobs_client.get_flight_info(flight.FlightDescriptor.for_command(
            json.dumps(body["source"]).encode()))
    before = act(jobs_client, "jobs", {"limit": 1000})
    with pytest.raises(type(planned.value)) as submitted:
        act(jobs_client, "submit", body)
    assert message(planned.value) in message(submitted.value)  # the same words
    assert act(jobs_client, "jobs", {"limit": 1000}) == before


def test_submit_needs_read_on_the_source_and_write_on_into(jobs_server) -> None:
    reader = raw_client(jobs_server.port, token_for("rita", read=(LCLS2_EXP,)))
    writer = raw_client(jobs_server.port, token_for("wes", write=(LCLS2_EXP,)))
    with pytest.raises(flight.FlightUnauthorizedError, match="may not write"):
        act(reader, "submit", submit_body("rights"))
    with pytest.raises(flight.FlightUnauthorizedError, match="may not read"):
        act(writer, "submit", submit_body("rights"))
    assert act(reader, "jobs", {}) == [] and act(writer, "jobs", {}) == []


def test_into_a_stream_that_cannot_take_the_results(jobs_client, client) -> None:
    with client.producer(LCLS2_EXP, "other-schema") as producer:
        producer.send(pa.record_batch({"x": pa.array([1.0, 2.0])}))
    with pytest.raises(pa.ArrowInvalid, match="do not fit stream 'other-schema'"):
        act(jobs_client, "submit", submit_body("other-schema", columns=["gmd/energy"]))
    client.end_run(LCLS2_EXP, "other-schema")
    with pytest.raises(pa.ArrowInvalid, match="ended as run"):
        act(jobs_client, "submit", submit_body("other-schema", columns=["gmd/energy"]))


# -- whose jobs -------------------------------------------------------------------------------


def test_others_jobs_do_not_exist_for_them(jobs_server, jobs_client) -> None:
    rights = {"read": (LCLS2_EXP,), "write": (LCLS2_EXP,)}
    alice = raw_client(jobs_server.port, token_for("alice", **rights))
    bob = raw_client(jobs_server.port, token_for("bob", **rights))
    boss = raw_client(jobs_server.port, token_for("boss", admin=(LCLS2_EXP,)))
    job = act(alice, "submit", submit_body("alices", columns=["gmd/energy"]))["job"]

    for action in ("job", "cancel"):
        with pytest.raises(pa.ArrowKeyError) as theirs:
            act(bob, action, {"job": job})
        with pytest.raises(pa.ArrowKeyError) as nobodys:
            act(bob, action, {"job": "f" * 32})
        assert message(theirs.value).replace(job, "ID") == \
            message(nobodys.value).replace("f" * 32, "ID")
    assert job not in [j["job"] for j in act(bob, "jobs", {})]
    assert [j["job"] for j in act(alice, "jobs", {})] == [job]
    assert act(boss, "job", {"job": job})["owner"] == "alice"  # admin of the into experiment
    assert job in [j["job"] for j in act(boss, "jobs", {"limit": 1000})]
    assert wait_for(alice, job)["state"] == "completed"


def test_the_same_key_returns_the_same_job(jobs_client) -> None:
    body = submit_body("keyed", columns=["gmd/energy"], key="nightly-7")
    first = act(jobs_client, "submit", body)
    again = act(jobs_client, "submit", body)
    assert again["job"] == first["job"] and again["new"] is False
    other = submit_body("keyed-2", columns=["gmd/energy"], key="nightly-7")
    with pytest.raises(pa.ArrowInvalid, match="used for another request"):
        act(jobs_client, "submit", other)
    wait_for(jobs_client, first["job"])


def test_two_active_jobs_never_share_a_stream(jobs_client) -> None:
    first = act(jobs_client, "submit", submit_body("shared", runs=(LONG_RUN,),
                                                   columns=["gmd/energy"]))
    with pytest.raises(pa.ArrowInvalid, match="name another stream"):
        act(jobs_client, "submit", submit_body("shared", columns=["gmd/energy"]))
    wait_for(jobs_client, first["job"])


def test_a_job_token_produces_its_stream_and_nothing_else(jobs_server, jobs_client) -> None:
    job = act(jobs_client, "submit", submit_body("tokened", columns=["gmd/energy"],
                                                 end_run=False))["job"]
    token = jobs_server.security.minter.mint(f"job:{job}", Grants(write=(LCLS2_EXP,)),
                                             600, job=job)
    worker = raw_client(jobs_server.port, token)
    with pytest.raises(flight.FlightUnauthorizedError, match="may only produce its stream"):
        list(worker.list_flights())
    with pytest.raises(flight.FlightUnauthorizedError, match="may only produce"):
        act(worker, "jobs", {})
    with pytest.raises(flight.FlightUnauthorizedError, match="may only produce"):
        worker.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, str(SMALL_RUN)))
    wait_for(jobs_client, job)
    with Client(f"grpc://127.0.0.1:{jobs_server.port}", token) as as_worker:
        for stream in ("tokened", "elsewhere"):  # the job has finished; elsewhere never
            producer = as_worker.producer(LCLS2_EXP, stream, producer_id=f"job-{job}-1")
            with pytest.raises(flight.FlightUnauthorizedError, match="not stored"):
                producer.send(pa.record_batch({"gmd/energy": pa.array([1.0])}))
                producer.close()


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_while_running_keeps_an_acknowledged_prefix(jobs_client, client) -> None:
    columns = ["gmd/energy", "pnccd/image"]
    job = act(jobs_client, "submit", submit_body("cancelled", runs=(LONG_RUN,),
                                                 columns=columns, end_run=False))["job"]
    wait_for(jobs_client, job, lambda s: s["state"] == "running"
             and s["progress"]["events"] > 0)
    stopped = act(jobs_client, "cancel", {"job": job})
    assert stopped["state"] == "cancelled"
    assert stopped["transitions"][-1]["reason"].startswith("cancelled by tester after")
    assert stopped["progress"]["events"] < stopped["progress"]["events_total"]

    held = client.read_stream(LCLS2_EXP, "cancelled")
    time.sleep(1.0)  # workers still running are refused: nothing is added after cancel
    assert client.read_stream(LCLS2_EXP, "cancelled").num_rows == held.num_rows
    source = client.read(LCLS2_EXP, LONG_RUN, ["gmd/energy"])
    n = held.num_rows
    assert 0 < n < source.num_rows
    np.testing.assert_array_equal(held.column("gmd/energy").to_numpy(),
                                  source.column("gmd/energy").to_numpy()[:n])  # a prefix
    assert act(jobs_client, "cancel", {"job": job})["state"] == "cancelled"  # idempotent


def test_listing_is_newest_first_and_filters_by_state(jobs_client) -> None:
    mine = act(jobs_client, "jobs", {"limit": 1000})
    assert [j["created"] for j in mine] == sorted((j["created"] for j in mine), reverse=True)
    assert all(j["state"] == "completed" for j in act(jobs_client, "jobs",
                                                      {"state": "completed"}))
    assert len(act(jobs_client, "jobs", {"limit": 2})) == min(2, len(mine))
    assert "transitions" not in mine[0]


# -- no scheduler: jobs wait, and say why ----------------------------------------------------


def test_with_the_scheduler_unreachable_jobs_stay_queued_and_say_why(jobs_data,
                                                                    tmp_path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    srv = start_server(jobs_data, dask_scheduler=address, job_limit=2,
                       jobs_database=tmp_path / "jobs.sqlite")
    try:
        c = raw_client(srv.port)
        first = act(c, "submit", submit_body("w1", columns=["gmd/energy"]))["job"]
        second = act(c, "submit", submit_body("w2", columns=["gmd/energy"]))["job"]
        status = wait_for(c, first, lambda s: "waiting" in s, timeout=30)
        assert status["state"] == "queued" and address in status["waiting"]
        with pytest.raises(pa.ArrowInvalid, match="you have 2 jobs queued or running"):
            act(c, "submit", submit_body("w3", columns=["gmd/energy"]))
        cancelled = act(c, "cancel", {"job": second})
        assert cancelled["state"] == "cancelled"
        assert cancelled["transitions"][-1]["reason"] == "cancelled by tester while queued"
        assert act(c, "submit", submit_body("w3", columns=["gmd/energy"]))["state"] == "queued"
        assert act(c, "whoami", {})["subject"] == "tester"  # the server answers
    finally:
        srv.shutdown()
