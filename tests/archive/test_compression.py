"""Compression on the wire: chosen per request (or the server's default, off on loopback), what
FlightInfo says, the bytes a link carries, and the same data after the client undoes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import connect
from flight_server import compression
from flight_server.errors import InvalidArgument
from flight_server.generator import generate_lcls2_run
from flight_server.server import LclstreamServer
from schemas import metadata as md
from schemas.json_input import RequestError
from tests.helpers import LCLS2_EXP, start_server
from tests.wire import CountingRelay

COLUMNS = ["pnccd/image", "tof/waveforms", "gmd/energy"]


@pytest.fixture
def relay(server: LclstreamServer) -> Iterator[CountingRelay]:
    with CountingRelay(server.port) as r:
        yield r


def carried(relay: CountingRelay, **options) -> tuple[pa.Table, int]:
    """A run read through the relay, and the bytes that crossed it towards the client."""
    with connect(relay.location) as c:
        c.plan(LCLS2_EXP, 7, COLUMNS, **options)  # connection and planning, not counted
        relay.reset()
        table = c.read(LCLS2_EXP, 7, COLUMNS, parallel=1, **options)
    return table, relay.to_client


def test_zstd_and_lz4_carry_fewer_bytes_and_the_same_data(relay: CountingRelay) -> None:
    plain, plain_bytes = carried(relay)
    zstd, zstd_bytes = carried(relay, compression="zstd")
    lz4, lz4_bytes = carried(relay, compression="lz4:9")
    assert zstd.equals(plain) and lz4.equals(plain)
    # detector frames with a few spots on a flat pedestal compress several-fold
    assert zstd_bytes < 0.6 * plain_bytes and lz4_bytes < 0.8 * plain_bytes
    assert plain_bytes > plain.nbytes * 0.95  # off on loopback: what Arrow holds, plus framing


def test_a_compressed_stream_resumes_exactly(server: LclstreamServer, client) -> None:
    """Compressed batches are sent by Arrow off the GIL, their progress announced by a zero-row
    batch before each: a cut between the two resumes without losing or repeating a batch."""
    expected = client.read(LCLS2_EXP, 7, COLUMNS)
    with CountingRelay(server.port, cut_after=96 * 1024) as cutting:
        with connect(cutting.location) as c:
            got = c.read(LCLS2_EXP, 7, COLUMNS, compression="zstd", parallel=1)
        assert cutting.cuts >= 3
    assert got.equals(expected)


def test_any_arrow_client_reads_a_compressed_stream(flight_client, client) -> None:
    info = client.plan(LCLS2_EXP, 7, COLUMNS, compression="lz4")
    chunks = list(flight_client.do_get(info.endpoints[0].ticket))
    markers = [c for c in chunks if not c.data.num_rows]
    data = [c for c in chunks if c.data.num_rows]
    # each data batch comes after the zero-row batch that says where to resume after it
    assert len(markers) == len(data) > 1
    assert all(c.app_metadata is None for c in data)
    assert all(b'"next_after"' in c.app_metadata.to_pybytes() for c in markers)
    read = pa.Table.from_batches([c.data for c in chunks])  # markers add no rows
    assert read.equals(client.read(LCLS2_EXP, 7, COLUMNS, events=(0, read.num_rows)))


def test_flight_info_says_what_doget_will_use(client) -> None:
    assert client.plan(LCLS2_EXP, 7).schema.metadata[md.COMPRESSION] == b"none"  # loopback
    info = client.plan(LCLS2_EXP, 7, compression="zstd:7")
    assert info.schema.metadata[md.COMPRESSION] == b"zstd:7"
    assert client.schema(LCLS2_EXP, 7).metadata[md.COMPRESSION] == b"none"


def test_the_servers_default_and_a_request_that_turns_it_off(data_root: Path) -> None:
    srv = start_server(data_root, compression="zstd")
    try:
        with CountingRelay(srv.port) as relay:
            default, default_bytes = carried(relay)
            off, off_bytes = carried(relay, compression="none")
            with connect(relay.location) as c:
                assert c.plan(LCLS2_EXP, 7).schema.metadata[md.COMPRESSION] == b"zstd"
                # Flight SQL results take the server's default: a Flight SQL ticket has no
                # room for options
                relay.reset()
                sql = c.sql(f'SELECT "pnccd/image" FROM {LCLS2_EXP}.events WHERE run = 7')
                sql_bytes = relay.to_client
        assert default.equals(off) and default_bytes < 0.6 * off_bytes
        assert sql.num_rows == 120 and sql_bytes < 0.6 * off_bytes
    finally:
        srv.shutdown()


def test_live_subscriptions_take_compression(tmp_path: Path) -> None:
    experiment = "zlive2026"  # in a data root of its own: live streams are kept there
    generate_lcls2_run(tmp_path / experiment / f"{experiment}_Run0001.h5", 1, n_events=90)
    srv = start_server(tmp_path)
    try:
        with connect(f"grpc://127.0.0.1:{srv.port}") as c:
            plain = c.read(experiment, 1, COLUMNS)
            with c.producer(experiment, "frames") as producer:
                for batch in plain.to_batches(max_chunksize=30):
                    producer.send(batch)
                producer.flush()
            with CountingRelay(srv.port) as relay, connect(relay.location) as r:
                got = []
                with r.subscribe(experiment, "frames", columns=COLUMNS,
                                 compression="zstd") as sub:
                    for batch in sub:
                        got.append(batch)
                        if sub.next >= plain.num_rows:
                            break
                carried_bytes = relay.to_client
        table = pa.Table.from_batches(got)
        assert all(table.column(c).equals(plain.column(c)) for c in COLUMNS)
        assert carried_bytes < 0.6 * plain.nbytes
    finally:
        srv.shutdown()


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"compression": "gzip"}, "is not one of"),
    ({"compression": "zstd:99"}, "compression_level: 99 is greater than the maximum of 22"),
    ({"compression": "lz4:0"}, "lz4 compression level must be an integer from 1 to 12"),
    ({"compression": "none:3"}, "takes no level"),
])
def test_bad_compression_is_refused_at_planning(client, options, message) -> None:
    with pytest.raises(pa.ArrowInvalid, match=message):
        client.plan(LCLS2_EXP, 7, **options)


def test_a_level_without_a_codec_is_refused(flight_client) -> None:
    cmd = b'{"v": 1, "experiment": "%s", "runs": [7], "compression_level": 3}' % \
        LCLS2_EXP.encode()
    with pytest.raises(pa.ArrowInvalid, match="compression_level needs a compression"):
        flight_client.get_flight_info(flight.FlightDescriptor.for_command(cmd))


def test_a_client_level_that_is_not_a_number_fails_before_sending(client) -> None:
    with pytest.raises(RequestError, match="compression level must be an integer"):
        client.plan(LCLS2_EXP, 7, compression="zstd:fast")


@pytest.mark.parametrize("setting, message", [
    ("gzip", "unknown compression 'gzip'"),
    ("zstd:x", "level must be an integer, got 'x'"),
    ("lz4:13", "lz4 compression level must be an integer from 1 to 12, got 13"),
])
def test_a_bad_server_setting_stops_the_server_at_start(data_root: Path, setting: str,
                                                        message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        start_server(data_root, compression=setting)


@pytest.mark.parametrize("peer, loopback", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.3.2.1:5000", True),
    ("ipv6:[::1]:5000", True), ("ipv6:[::ffff:127.0.0.1]:5000", True), ("unix:/tmp/s", True),
    ("ipv6:%5B::1%5D:37906", True),  # as gRPC reports a client of [::1] or localhost
    ("ipv4:10.0.0.7:5000", False), ("ipv6:[2001:db8::1]:5000", False), ("", False),
    ("ipv6:%5B2001:db8::1%5D:5000", False),
])
def test_auto_is_off_on_loopback_only(peer: str, loopback: bool) -> None:
    wire = compression.resolve(None, None, compression.AUTO, peer)
    assert wire == (compression.NONE if loopback else compression.Compression("zstd"))
