"""Bounded everywhere: memory a request's processing may take, values a client may send, the
size of what an error quotes, and the logs; runs of one experiment stay its own."""

from __future__ import annotations

import json
import logging
import math
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import connect
from flight_server.catalog import Catalog
from flight_server.generator import generate_lcls2_run
from flight_server.server import LclstreamServer
from tests.helpers import (
    EXP,
    LCLS2_EXP,
    LCLSTREAM,
    cli_env,
    events,
    free_port,
    raw_client,
    start_server,
    wait_for_location,
)

DEEP = 5000  # levels: past Python's recursion limit


def request(**fields: object) -> flight.FlightDescriptor:
    doc = {"v": 1, "experiment": LCLS2_EXP, "runs": [7], **fields}
    return flight.FlightDescriptor.for_command(json.dumps(doc).encode())


def invalid(call, *phrases: str) -> str:
    """The call fails with INVALID_ARGUMENT (pyarrow's ArrowInvalid), saying each phrase."""
    with pytest.raises(pa.ArrowInvalid) as info:
        call()
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message[:500]!r}"
    return message


# -- memory a request may take (defect 6) ------------------------------------------------------

PAD = {"step": "pad", "column": "pnccd/image", "height": 8192, "width": 8192}


def test_processing_that_needs_too_much_memory_is_refused_before_reading(
        server: LclstreamServer, flight_client: flight.FlightClient, sign) -> None:
    """200 bytes asked for a pad to 8192 x 8192 (128 MiB per event, ~1 GiB per batch)."""
    descriptor = request(columns=["pnccd/image"], processing=[PAD])
    invalid(lambda: flight_client.get_flight_info(descriptor), "per event", "request_memory")
    ticket = {"v": 1, "experiment": LCLS2_EXP, "run": 7, "columns": ["pnccd/image"],
              "start": 0, "stop": 120, "step": 1, "processing": [PAD]}
    sealed = flight.Ticket(sign(json.dumps(ticket).encode()))
    invalid(lambda: flight_client.do_get(sealed).read_all(), "per event")


def test_batches_are_sized_by_what_processing_makes(server: LclstreamServer,
                                                    flight_client: flight.FlightClient) -> None:
    """A pad that makes 2 MiB per event from a few KiB: batches hold fewer events than the
    raw frames would (sized by what is made, not what is read), within the request's memory."""

    def batch_rows(**fields: object) -> list[int]:
        info = flight_client.get_flight_info(request(columns=["pnccd/image"], **fields))
        return [chunk.data.num_rows for endpoint in info.endpoints
                for chunk in flight_client.do_get(endpoint.ticket)]

    step = {**PAD, "height": 1024, "width": 1024}
    padded, raw = batch_rows(processing=[step]), batch_rows()
    assert sum(padded) == sum(raw) == 120
    assert max(padded) < max(raw)
    assert max(padded) * 2 * 2**20 <= server.sizing.event_budget


# -- values in range, JSON bounded (defects 7, 8) ---------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("command", [
    f'{{"v": 1, "experiment": "tmox42619", "runs": [7], "processing": {nested(DEEP)}}}',
    f'{{"v": 1, "experiment": "tmox42619", "stream": "s", "columns": {nested(DEEP)}}}',
    nested(DEEP),
    f'{{"v": 1, "experiment": "tmox42619", "runs": [7], "columns": {nested(40)}}}',
], ids=["processing", "subscription", "bare", "40-levels"])
def test_deeply_nested_json_is_invalid_argument(flight_client: flight.FlightClient,
                                                command: str) -> None:
    descriptor = flight.FlightDescriptor.for_command(command.encode())
    invalid(lambda: flight_client.get_flight_info(descriptor), "nested too deeply")
    invalid(lambda: flight_client.get_schema(descriptor), "nested too deeply")


def test_deep_json_in_tickets_and_action_bodies(flight_client: flight.FlightClient) -> None:
    ticket = flight.Ticket((f'{{"stream": {nested(DEEP)}}}').encode())
    with pytest.raises(flight.FlightError) as info:
        flight_client.do_get(ticket).read_all()
    assert not isinstance(info.value, flight.FlightInternalError), info.value
    for action in ("commit", "end_run", "streams"):
        invalid(lambda a=action: list(flight_client.do_action(
            flight.Action(a, nested(DEEP).encode()))), "nested too deeply")


@pytest.mark.parametrize("doc, phrase", [
    ({"runs": [1e308]}, "runs/0"),
    ({"runs": [7.0]}, "runs/0"),
    ({"runs": [2**40]}, "runs/0"),
    ({"events": {"stop": 2**63}}, "events/stop"),
], ids=["1e308", "7.0", "2**40", "2**63"])
def test_numbers_out_of_range_are_invalid_argument(flight_client: flight.FlightClient,
                                                   doc: dict, phrase: str) -> None:
    invalid(lambda: flight_client.get_flight_info(request(**doc)), phrase)


@pytest.mark.parametrize("text, phrase", [
    ('{"v": 1, "experiment": "tmox42619", "runs": [7], "processing": [{"step": "threshold", '
     '"column": "pnccd/image", "below": NaN}]}', "NaN is not a JSON number"),
    ('{"v": 1, "experiment": "tmox42619", "runs": [7], "processing": [{"step": "threshold", '
     '"column": "pnccd/image", "below": 1e999}]}', "beyond the range"),
    ('{"v": 1, "experiment": "tmox42619", "runs": [%s]}' % ("9" * 5000), "5000 digits"),
], ids=["NaN", "1e999", "5000-digits"])
def test_numbers_json_cannot_hold_are_invalid_argument(flight_client: flight.FlightClient,
                                                       text: str, phrase: str) -> None:
    descriptor = flight.FlightDescriptor.for_command(text.encode())
    invalid(lambda: flight_client.get_flight_info(descriptor), phrase)


def test_a_5000_digit_run_in_a_path_is_invalid_argument(flight_client) -> None:
    descriptor = flight.FlightDescriptor.for_path(LCLS2_EXP, "9" * 5000)
    invalid(lambda: flight_client.get_flight_info(descriptor), "at most 10 digits")


def test_streams_with_a_non_string_experiment_is_invalid_argument(flight_client) -> None:
    for body in (b'{"experiment": 5}', b'{"experiment": ["a"]}', b'{"experiment": null}'):
        invalid(lambda b=body: list(flight_client.do_action(flight.Action("streams", b))),
                "'experiment' is an experiment name or glob")


@pytest.mark.parametrize("retention", [
    '{"seconds": NaN}', '{"seconds": 1e300}', '{"bytes": 1e300}', '{"seconds": Infinity}',
    '{"bytes": 0.5}', '{"bytes": 1267650600228229401496703205376}',
])
def test_bad_retention_is_refused_and_the_stream_carries_on(
        live_server: LclstreamServer, retention: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    location = f"grpc://127.0.0.1:{live_server.port}"
    batch = events(0, n=4)
    with raw_client(live_server.port) as client:
        writer, _ = client.do_put(flight.FlightDescriptor.for_path(EXP, "live", "r"),
                                  batch.schema)
        meta = f'{{"producer": "p", "seq": 0, "retention": {retention}}}'
        with pytest.raises(pa.ArrowInvalid, match="retention|not a JSON number|digits"):
            writer.write_with_metadata(batch, pa.py_buffer(meta.encode()))
            writer.done_writing()
            writer.close()
    with connect(location) as c:
        with c.producer(EXP, "r") as producer:
            producer.send(batch)
        (stream,) = c.streams(EXP)
        assert stream["events"] == 4
        assert stream["retention"] == {"bytes": 16 << 30, "seconds": 24 * 3600.0}
    live_server.live.streams.get(EXP, "r").apply_retention()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_bad_retention_saved_by_an_older_server_is_dropped_at_start(tmp_path: Path) -> None:
    (tmp_path / EXP).mkdir()
    srv = start_server(tmp_path)
    with connect(f"grpc://127.0.0.1:{srv.port}") as c, c.producer(EXP, "old") as producer:
        producer.send(events(0, n=4))
    srv.shutdown()
    state = tmp_path / EXP / "live" / "old" / "stream.json"
    state.write_text(json.dumps({"retention": {"seconds": math.nan, "bytes": 10**300}}))
    srv = start_server(tmp_path)
    try:
        stream = srv.live.streams.get(EXP, "old")
        assert stream.retention == (16 << 30, 24 * 3600.0)
        stream.apply_retention()  # it failed once a second, for ever, with the saved values
        assert stream.log.end == 4
    finally:
        srv.shutdown()


# -- errors quote a short excerpt; audit lines are bounded (defect 9) -------------------------


def test_errors_quote_an_excerpt_of_long_values(flight_client: flight.FlightClient,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A 1 MB experiment name: the whole name in the error made gRPC drop the status (the
    client saw RESOURCE_EXHAUSTED "Stream removed"), and each call wrote a 1 MB audit line."""
    caplog.set_level(logging.INFO, logger="lclstream.audit")
    name = "x" * 1_000_000
    long_values = [
        lambda: flight_client.get_flight_info(flight.FlightDescriptor.for_path(name, "7")),
        lambda: flight_client.get_flight_info(request(experiment="y" * 60_000)),
        lambda: flight_client.get_flight_info(request(columns=["c" * 1000] * 50)),
        lambda: list(flight_client.do_action(flight.Action(
            "commit", json.dumps({"experiment": "z" * 60_000, "stream": "s"}).encode()))),
    ]
    for call in long_values:
        with pytest.raises((pa.ArrowInvalid, pa.ArrowKeyError)) as info:
            call()
        assert len(str(info.value)) < 6000
    lines = [r.getMessage() for r in caplog.records if r.name == "lclstream.audit"]
    assert lines and max(map(len, lines)) < 2000


# -- runs stay in their experiment (defect 10) ------------------------------------------------


def test_a_link_into_another_experiment_is_not_served(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    a, b = tmp_path / "expa", tmp_path / "expb"
    generate_lcls2_run(b / "expb_Run0001.h5", 1, n_events=5, seed=1)
    generate_lcls2_run(a / "store" / "expa_Run0002.h5", 2, n_events=5, seed=2)
    a.joinpath("r0098.h5").symlink_to("../expb/expb_Run0001.h5")  # another experiment's run
    a.joinpath("r0003.h5").symlink_to("store/expa_Run0002.h5")  # within its own tree: fine
    a.joinpath("r0004.h5").symlink_to("/nonexistent/r0004.h5")  # dangling
    caplog.set_level(logging.WARNING, logger="flight_server.catalog")
    catalog = Catalog(tmp_path)
    for _ in range(5):
        found = catalog.scan()
    assert sorted(found["expa"]) == [2, 3]
    assert sorted(found["expb"]) == [1]
    refused = [r for r in caplog.records if "r0098.h5" in r.getMessage()]
    assert len(refused) == 1, "each refused link is logged once, not at every scan"
    catalog.close()


# -- the server's log rotates (defect 11) ------------------------------------------------------


@pytest.mark.slow
def test_the_log_and_the_audit_file_rotate_by_size(tmp_path: Path) -> None:
    (tmp_path / "data" / EXP).mkdir(parents=True)
    log, audit = tmp_path / "server.log", tmp_path / "audit.log"
    proc = subprocess.Popen(
        [*LCLSTREAM, "serve", "--data", str(tmp_path / "data"), "--port", str(free_port()),
         "--log-file", str(log), "--audit-log", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=cli_env(LCLSTREAM_LOG_MAX_BYTES="4096", LCLSTREAM_LOG_BACKUPS="2"))
    try:
        location = wait_for_location(proc)
        with connect(location) as c:
            for _ in range(100):
                c.streams()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for path in (log, audit):
        files = sorted(tmp_path.glob(path.name + "*"))
        assert [f.name for f in files] == [path.name, path.name + ".1", path.name + ".2"]
        assert all(f.stat().st_size <= 4096 + 1024 for f in files)
