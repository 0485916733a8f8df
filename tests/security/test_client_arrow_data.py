"""Arrow data sent by clients is validated in full before anything reads or stores it.

An IPC batch whose buffers contradict its offsets or views reads back from the wire like any
other; the kernels that follow those offsets then read past their buffers. These batches are
made the way an attacker makes them: valid arrays whose buffers are then edited.
"""

from __future__ import annotations

import struct

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import schemas.flight_sql as fsql
from clients import connect
from flight_server.errors import InvalidArgument
from flight_server.security.client_data import validated
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import EXP, LCLS2_EXP, events, raw_client


def lying_binary_view(length: int) -> pa.Array:
    """A binary_view whose one view claims `length` bytes of a 20-byte data buffer."""
    honest = pa.array([b"x" * 20], type=pa.binary_view())
    views = bytearray(honest.buffers()[1].to_pybytes())
    struct.pack_into("<i", views, 0, length)
    return pa.Array.from_buffers(pa.binary_view(), 1,
                                 [None, pa.py_buffer(bytes(views)), honest.buffers()[2]])


def lying_list() -> pa.RecordBatch:
    """Two events whose ragged column's first offset points a million values past the three
    there are; the last offset is honest, so Arrow's cheap (shallow) validation passes it."""
    values = pa.array([1.0, 2.0, 3.0], pa.float32())
    offsets = pa.array([0, 1_000_000, 3], pa.int32())
    column = pa.Array.from_buffers(pa.list_(pa.float32()), 2, [None, offsets.buffers()[1]],
                                   children=[values])
    return pa.record_batch([pa.array([0.5, 1.0]), column], names=["gmd/energy", "peaks/var_x"])


def invalid_utf8() -> pa.Array:
    offsets = pa.array([0, 2], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])


@pytest.mark.parametrize("batch", [
    pa.record_batch([lying_binary_view(8 * 1024 * 1024)], names=["p"]),
    pa.record_batch([lying_binary_view(2**30)], names=["p"]),
    lying_list(),
    pa.record_batch([invalid_utf8()], names=["p"]),
], ids=["view-8MiB", "view-1GiB", "list-offsets", "utf8"])
def test_full_validation_refuses_what_the_ipc_reader_lets_through(batch: pa.RecordBatch) -> None:
    batch.validate()  # the shallow check the IPC reader makes: it passes
    with pytest.raises(InvalidArgument, match="not valid Arrow data"):
        validated(batch, "the batch")


# -- Flight SQL parameters ---------------------------------------------------------------------


def prepare(client: flight.FlightClient, query: str) -> bytes:
    body = fsql.pack(fsql.ActionCreatePreparedStatementRequest(query=query))
    result = next(iter(client.do_action(flight.Action("CreatePreparedStatement", body))))
    return fsql.unpack(result.body.to_pybytes()).prepared_statement_handle


def bind(client: flight.FlightClient, handle: bytes, batch: pa.RecordBatch) -> bytes:
    command = fsql.pack(fsql.CommandPreparedStatementQuery(prepared_statement_handle=handle))
    writer, reader = client.do_put(flight.FlightDescriptor.for_command(command), batch.schema)
    writer.write_batch(batch)
    writer.done_writing()
    answer = reader.read()
    writer.close()
    result = fsql.DoPutPreparedStatementResult.FromString(answer.to_pybytes())
    return result.prepared_statement_handle


def read_only_token(server: LclstreamServer) -> str:
    return server.security.minter.mint("reader", Grants.build(read=[LCLS2_EXP]), 600)


@pytest.mark.parametrize("length", [8 * 1024 * 1024, 2**30], ids=["8MiB", "1GiB"])
def test_a_lying_parameter_is_refused_and_discloses_nothing(server: LclstreamServer,
                                                            length: int) -> None:
    """A read-only user binds a binary_view parameter whose view reaches past its buffer: the
    server copied 8 MiB of its heap back to the caller (another user's token, query results),
    and with 1 GiB it crashed."""
    with raw_client(server.port, read_only_token(server)) as client:
        handle = prepare(client, "SELECT ?::BLOB AS p")
        bad = pa.record_batch([lying_binary_view(length)], names=["p"])
        with pytest.raises(pa.ArrowInvalid, match="not valid Arrow data"):
            bind(client, handle, bad)
        # the server still answers, and honest parameters still bind and run
        honest = bind(client, handle, pa.record_batch([pa.array([b"abc"], pa.binary_view())],
                                                      names=["p"]))
        command = fsql.pack(fsql.CommandPreparedStatementQuery(prepared_statement_handle=honest))
        info = client.get_flight_info(flight.FlightDescriptor.for_command(command))
        table = client.do_get(info.endpoints[0].ticket).read_all()
        assert table.column("p").to_pylist() == [b"abc"]


@pytest.mark.parametrize("batch, phrase", [
    (pa.record_batch([invalid_utf8()], names=["p"]), "not valid Arrow data"),
    (pa.record_batch([pa.array([[1, 2]], pa.list_(pa.int64()))], names=["p"]), "not accepted"),
    (pa.record_batch([pa.array([1], pa.int64()).dictionary_encode()], names=["p"]),
     "not accepted"),
], ids=["bad-utf8", "list", "dictionary"])
def test_parameters_outside_the_allow_list_or_corrupt_are_invalid_argument(
        server: LclstreamServer, batch: pa.RecordBatch, phrase: str) -> None:
    with raw_client(server.port, read_only_token(server)) as client:
        handle = prepare(client, "SELECT ? AS p")
        with pytest.raises(pa.ArrowInvalid, match=phrase):
            bind(client, handle, batch)


# -- live ingest -------------------------------------------------------------------------------


def writer_token(server: LclstreamServer) -> str:
    return server.security.minter.mint("daq", Grants.build(read=[EXP], write=[EXP]), 600)


def test_a_lying_live_batch_is_refused_and_nothing_is_stored(live_server: LclstreamServer
                                                             ) -> None:
    """A producer with write rights sends ragged events whose offsets point past their values:
    the batch was acknowledged and stored, and the first filtered subscriber crashed the server,
    again after every restart."""
    location = f"grpc://127.0.0.1:{live_server.port}"
    good = events(0, n=2).select(["gmd/energy", "peaks/var_x"])
    descriptor = flight.FlightDescriptor.for_path(EXP, "live", "poisoned")
    with raw_client(live_server.port, writer_token(live_server)) as client:
        writer, _ = client.do_put(descriptor, good.schema)
        with pytest.raises(pa.ArrowInvalid, match="not valid Arrow data"):
            writer.write_batch(lying_list())
            writer.done_writing()
            writer.close()
    with connect(location) as c:
        assert [s for s in c.streams(EXP) if s["stream"] == "poisoned"] == []
        # an honest producer can still use the name, and a filtered subscriber reads it back
        with c.producer(EXP, "poisoned") as producer:
            producer.send(good)
        got = next(iter(c.subscribe(EXP, "poisoned", filter="gmd/energy >= 0")))
        assert got.column("peaks/var_x").to_pylist() == good.column("peaks/var_x").to_pylist()


def test_a_refused_producer_leaves_no_stream_behind(live_server: LclstreamServer) -> None:
    location = f"grpc://127.0.0.1:{live_server.port}"
    descriptor = flight.FlightDescriptor.for_path(EXP, "live", "refused")
    with raw_client(live_server.port, writer_token(live_server)) as client:
        batch = events(0, n=3)
        writer, _ = client.do_put(descriptor, batch.schema)
        with pytest.raises(pa.ArrowInvalid):
            writer.write_with_metadata(batch, pa.py_buffer(b'{"seq": 1}'))  # seq alone: refused
            writer.done_writing()
            writer.close()
    with connect(location) as c:
        assert [s["stream"] for s in c.streams(EXP)] == []
    assert not (live_server.settings.data / EXP / "live" / "refused").exists()
