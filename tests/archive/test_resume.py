"""A DoGet that breaks off resumes from the first event the client has not received: through
a link that cuts every connection after a few hundred KiB, reads equal uninterrupted ones,
every event exactly once; resume tickets are sealed, range-checked and re-authorised."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import connect
from clients.client import EndpointReader
from flight_server.generator import generate_lcls2_run
from flight_server.server import LclstreamServer
from schemas.resume import read_progress, resume_ticket
from tests.helpers import LCLS2_EXP, free_port, raw_client
from tests.jobs.conftest import token_for
from tests.live.test_live_faults import Server
from tests.wire import CountingRelay

COLUMNS = ["gmd/energy", "pnccd/image", "tof/waveforms", "peaks/var_x"]


@pytest.fixture
def flaky(server: LclstreamServer) -> Iterator[CountingRelay]:
    with CountingRelay(server.port, cut_after=300 * 1024) as relay:
        yield relay


def test_reads_through_a_link_that_keeps_dropping_equal_uninterrupted_ones(
        client, flaky: CountingRelay) -> None:
    expected = client.read(LCLS2_EXP, [7, 8], COLUMNS)
    with connect(flaky.location) as c:
        got = c.read(LCLS2_EXP, [7, 8], COLUMNS, parallel=2)
        streamed = pa.Table.from_batches(list(c.stream(LCLS2_EXP, 7, COLUMNS)))
    assert flaky.cuts >= 4  # the link broke, several times
    assert got.equals(expected)
    assert streamed.equals(client.read(LCLS2_EXP, 7, COLUMNS))


def test_filters_and_event_slices_resume_exactly(client, flaky: CountingRelay) -> None:
    shape = {"filter": "gmd/energy > 1.2", "events": slice(3, 119, 2)}
    expected = client.read(LCLS2_EXP, 7, COLUMNS, **shape)
    with connect(flaky.location) as c:
        got = c.read(LCLS2_EXP, 7, COLUMNS, **shape)
    assert flaky.cuts >= 1 and got.equals(expected)


def test_without_resume_the_break_is_raised(flaky: CountingRelay) -> None:
    with connect(flaky.location) as c, pytest.raises(flight.FlightError):
        c.read(LCLS2_EXP, 7, COLUMNS, resume=False)


def test_each_batch_says_where_to_resume(flight_client) -> None:
    info = flight_client.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, "7"))
    ticket = json.loads(info.endpoints[0].ticket.ticket.rpartition(b".")[0])
    marks = [read_progress(chunk.app_metadata.to_pybytes())
             for chunk in flight_client.do_get(info.endpoints[0].ticket)]
    assert marks == sorted(marks) and marks[-1] == ticket["stop"] and len(marks) > 1

    # resuming from the middle gives the rest, and from the end nothing
    middle = marks[len(marks) // 2 - 1]
    rest = flight_client.do_get(flight.Ticket(
        resume_ticket(info.endpoints[0].ticket.ticket, middle))).read_all()
    whole = flight_client.do_get(info.endpoints[0].ticket).read_all()
    assert rest.equals(whole.slice(middle - ticket["start"]))
    end = flight_client.do_get(flight.Ticket(
        resume_ticket(info.endpoints[0].ticket.ticket, ticket["stop"]))).read_all()
    assert end.num_rows == 0


def test_resume_tickets_are_sealed_checked_and_reauthorised(server: LclstreamServer,
                                                           flight_client) -> None:
    desc = flight.FlightDescriptor.for_command(json.dumps(
        {"v": 1, "experiment": LCLS2_EXP, "runs": [7], "events": {"start": 10, "stop": 60,
                                                                   "step": 5}}).encode())
    sealed = flight_client.get_flight_info(desc).endpoints[0].ticket.ticket
    for at, message in ((5, "outside|range"), (61, "range"), (12, "range")):
        with pytest.raises(pa.ArrowInvalid, match=message):
            flight_client.do_get(flight.Ticket(resume_ticket(sealed, at))).read_all()
    tampered = sealed.replace(b'"stop":60', b'"stop":120')
    with pytest.raises(flight.FlightUnauthorizedError, match="altered"):
        flight_client.do_get(flight.Ticket(resume_ticket(tampered, 10))).read_all()
    with pytest.raises(pa.ArrowInvalid, match="resume ticket is"):
        flight_client.do_get(flight.Ticket(b'{"v":1,"resume":"x","from":"3"}')).read_all()
    assert flight_client.do_get(flight.Ticket(resume_ticket(sealed, 15))).read_all().num_rows == 9

    other = raw_client(server.port, token_for("mallory", read=("cxi*",)))
    with pytest.raises(flight.FlightUnauthorizedError, match="may not read"):
        other.do_get(flight.Ticket(resume_ticket(sealed, 15))).read_all()
    other.close()


def test_the_reader_counts_its_resumptions(server: LclstreamServer, client) -> None:
    with CountingRelay(server.port, cut_after=200 * 1024) as relay:
        c = raw_client(relay.location)
        endpoints = c.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(
            {"v": 1, "experiment": LCLS2_EXP, "runs": [7], "columns": COLUMNS}).encode()
        )).endpoints
        readers = [EndpointReader(c, e.ticket) for e in endpoints]
        got = pa.Table.from_batches([b for r in readers for b in r], schema=readers[0].schema)
        c.close()
    resumed = sum(r.resumed for r in readers)
    # every cut is resumed (an attempt made at once may meet the broken channel and count too)
    assert relay.cuts >= 2 and resumed >= relay.cuts
    assert got.equals(client.read(LCLS2_EXP, 7, COLUMNS))


@pytest.mark.slow
def test_a_read_survives_a_kill_9_and_restart_of_the_server(tmp_path: Path,
                                                            monkeypatch) -> None:
    """The server process is killed mid-stream and started again on the same port: the read
    resumes where it stopped and returns what an uninterrupted one does."""
    root = tmp_path / "data"
    generate_lcls2_run(root / LCLS2_EXP / f"{LCLS2_EXP}_Run0003.h5", 3, n_events=1500, seed=3)
    monkeypatch.setenv("LCLSTREAM_BATCH_BYTES", str(256 * 1024))  # many batches in the stream
    server = Server(root, free_port(), tmp_path / "server.log")
    location = server.start()
    try:
        with connect(location) as c:
            expected = c.read(LCLS2_EXP, 3, COLUMNS)
            [endpoint] = c.plan(LCLS2_EXP, 3, COLUMNS).endpoints
        flight_client = raw_client(location)
        reader = EndpointReader(flight_client, endpoint.ticket)
        batches = iter(reader)
        got = [next(batches), next(batches)]  # the stream is under way
        server.kill()
        server.start()
        got += list(batches)
        flight_client.close()
        assert reader.resumed >= 1
        table = pa.Table.from_batches(got)
        assert all(table.column(n).equals(expected.column(n)) for n in COLUMNS)
    finally:
        server.stop()
