"""Live streams end to end: real producers and consumers over loopback against a real server."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import Client, connect
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from schemas.live import Delivery
from tests.helpers import EXP, events, indices, raw_client, start_server


@pytest.fixture
def live_root(tmp_path: Path) -> Path:
    (tmp_path / EXP).mkdir()
    return tmp_path


@pytest.fixture
def server(live_root: Path) -> Iterator[LclstreamServer]:
    srv = start_server(live_root, live_fsync_interval=0.01, live_ring_bytes=64 * 1024,
                       live_segment_bytes=32 * 1024)
    threading.Thread(target=srv.serve, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def client(server: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{server.port}") as c:
        yield c


def token(server: LclstreamServer, **grants: list[str]) -> str:
    return server.security.minter.mint("someone", Grants.build(**grants), 600)


def produce(client: Client, stream: str, batches: int, first: int = 0, **options) -> dict:
    with client.producer(EXP, stream, **options) as producer:
        for i in range(batches):
            producer.send(events(first + 10 * i))
    return {"last_ack": producer.last_ack}


def collect(subscription, count: int, close: bool = True) -> list[pa.RecordBatch]:
    got = []
    for batch in subscription:
        got.append(batch)
        if sum(b.num_rows for b in got) >= count:
            break
    if close:
        subscription.close()
    return got


# -- producing and subscribing ----------------------------------------------------------------


def test_acked_batches_replay_identically_with_offsets(client: Client) -> None:
    with client.producer(EXP, "daq") as producer:
        for i in range(12):
            producer.send(events(10 * i))
        producer.flush()
        assert producer.last_ack.offset == 110 and producer.last_ack.events == 10
    sub = client.subscribe(EXP, "daq")
    got = collect(sub, 120)
    assert indices(got) == list(range(120))
    assert pa.Table.from_batches(got).equals(pa.Table.from_batches(
        [events(10 * i) for i in range(12)]))
    assert (sub.offset, sub.next) == (110, 120)


def test_consumer_tails_new_batches_and_ends_with_the_run(client: Client) -> None:
    produce(client, "tail", 2)
    received: list[pa.RecordBatch] = []
    consumer = threading.Thread(target=lambda: received.extend(client.subscribe(EXP, "tail")))
    consumer.start()
    produce(client, "tail", 3, first=20)
    ended = client.end_run(EXP, "tail")
    consumer.join(timeout=20)
    assert not consumer.is_alive(), "the subscription must end when the stream ends"
    assert indices(received) == list(range(50))
    assert ended["events"] == 50


def test_from_latest_offset_and_time(client: Client) -> None:
    produce(client, "from", 3)
    time.sleep(0.05)
    middle = dt.datetime.now(dt.UTC)
    time.sleep(0.05)
    produce(client, "from", 2, first=30)
    assert indices(collect(client.subscribe(EXP, "from", from_=25), 25)) == list(range(25, 50))
    assert indices(collect(client.subscribe(EXP, "from", from_=middle), 20)) == list(range(30, 50))
    assert indices(collect(client.subscribe(EXP, "from", from_=middle.isoformat()), 20)) == \
        list(range(30, 50))
    latest = client.subscribe(EXP, "from", from_="latest")
    got: list[pa.RecordBatch] = []
    consumer = threading.Thread(target=lambda: got.extend(collect(latest, 10)))
    consumer.start()
    deadline = time.monotonic() + 10
    while not client.streams(EXP)[0]["consumers"] and time.monotonic() < deadline:
        time.sleep(0.02)
    produce(client, "from", 1, first=50)
    consumer.join(timeout=20)
    assert indices(got) == list(range(50, 60))


def test_filter_columns_and_processing_on_a_live_stream(client: Client) -> None:
    produce(client, "shaped", 5)
    sub = client.subscribe(EXP, "shaped", columns=["gmd/energy", "tof/waveforms"],
                           filter='"gmd/energy" >= 12',
                           processing=[{"step": "cast", "column": "tof/waveforms",
                                        "to": "float16"}])
    got = collect(sub, 26)
    table = pa.Table.from_batches(got)
    assert table.column_names == ["gmd/energy", "tof/waveforms"]
    assert table.column("gmd/energy").to_pylist() == [i * 0.5 for i in range(24, 50)]
    assert table.schema.field("tof/waveforms").type.value_type == pa.float16()


def test_list_flights_shows_live_streams_with_a_growing_count(client: Client,
                                                              server: LclstreamServer) -> None:
    produce(client, "listed", 2)
    flights = raw_client(server.port)
    live = [f for f in flights.list_flights() if len(f.descriptor.path) == 3]
    assert [[p.decode() for p in f.descriptor.path] for f in live] == [[EXP, "live", "listed"]]
    assert live[0].schema.metadata[b"lclstream.live"] == b"true"
    assert live[0].total_records == 20
    assert client.runs(EXP).is_empty(), "a live stream is not a run yet"
    produce(client, "listed", 1, first=20)
    info = flights.get_flight_info(flight.FlightDescriptor.for_path(EXP, "live", "listed"))
    assert info.total_records == 30
    reader = flights.do_get(info.endpoints[0].ticket)
    chunk = reader.read_chunk()
    assert Delivery.decode(chunk.app_metadata.to_pybytes()) == Delivery(0, 10)
    reader.cancel()
    client.end_run(EXP, "listed")
    assert not [f for f in flights.list_flights() if len(f.descriptor.path) == 3]
    assert client.runs(EXP)["run"].to_list() == [1]


# -- the run a stream becomes -----------------------------------------------------------------


def test_ended_stream_is_a_run_for_doget_and_sql(client: Client) -> None:
    produce(client, "acq", 4)
    ended = client.end_run(EXP, "acq", run=21)
    assert ended == {"experiment": EXP, "stream": "acq", "run": 21, "events": 40,
                     "first_offset": 0}
    assert client.end_run(EXP, "acq") == ended  # idempotent: a retried end_run is harmless
    run = client.read(EXP, 21)
    sent = pa.Table.from_batches([events(10 * i) for i in range(4)])
    for name in sent.column_names:
        assert run.column(name).to_pylist() == sent.column(name).to_pylist(), name
    total = client.sql(f'SELECT count(*) AS n, sum("gmd/energy") AS s FROM {EXP}.events '
                       "WHERE run = 21")
    assert total.to_pylist() == [{"n": 40, "s": sum(i * 0.5 for i in range(40))}]
    with pytest.raises(pa.ArrowInvalid, match="ended as run 21"):
        produce(client, "acq", 1)
    produce(client, "second", 1)
    assert client.end_run(EXP, "second")["run"] == 22  # the next free number
    assert client.read(EXP, 22).num_rows == 10


def test_end_run_refused_while_a_producer_is_connected(client: Client) -> None:
    producer = client.producer(EXP, "busy")
    producer.send(events(0))
    producer.flush()
    with pytest.raises(pa.ArrowInvalid, match="producer"):
        client.end_run(EXP, "busy")
    producer.close()
    assert client.end_run(EXP, "busy")["events"] == 10


# -- producers: acks, resends, schemas, grants ------------------------------------------------


def test_resent_batches_are_not_stored_twice(client: Client) -> None:
    first = client.producer(EXP, "dedupe", producer_id="daq-1")
    for i in range(5):
        first.send(events(10 * i))
    first.close()
    again = client.producer(EXP, "dedupe", producer_id="daq-1")
    for i in range(7):  # a restarted producer resends 1..5, then sends 6 and 7
        again.send(events(10 * i))
    again.close()
    assert again.duplicates == 5
    assert again.last_ack.offset == 60
    assert indices(collect(client.subscribe(EXP, "dedupe"), 70)) == list(range(70))


def test_schema_change_is_refused_and_the_stream_is_intact(client: Client) -> None:
    produce(client, "schema", 2)
    changed = events(20).append_column("extra", pa.array(np.zeros(10)))
    retyped = events(20).set_column(1, "gmd/energy", pa.array(np.zeros(10, np.float32)))
    for batch, message in [(changed, "'extra' is new"),
                           (retyped, "'gmd/energy' is float, the stream has double")]:
        with pytest.raises(pa.ArrowInvalid, match=message):
            with client.producer(EXP, "schema") as producer:
                producer.send(batch)
    # A producer that changes schema mid-stream opens a new DoPut, which is refused.
    with pytest.raises(pa.ArrowInvalid, match="'extra' is new"):
        with client.producer(EXP, "schema") as producer:
            producer.send(events(20))
            producer.send(changed)
    assert indices(collect(client.subscribe(EXP, "schema"), 30)) == list(range(30))


def test_producer_needs_the_write_grant(server: LclstreamServer) -> None:
    location = f"grpc://127.0.0.1:{server.port}"
    with connect(location, token=token(server, read=["*"])) as reader:
        with pytest.raises(flight.FlightUnauthorizedError, match="write"):
            produce(reader, "nowrite", 1)
        with pytest.raises(flight.FlightUnauthorizedError, match="write"):
            reader.end_run(EXP, "nowrite")
    with connect(location, token=token(server, write=[EXP])) as writer:
        produce(writer, "nowrite", 1)  # write alone suffices to produce, not to read
        with pytest.raises(flight.FlightUnauthorizedError):
            collect(writer.subscribe(EXP, "nowrite"), 1)
    with connect(location, token=token(server, write=["other"])) as elsewhere:
        with pytest.raises(flight.FlightUnauthorizedError):
            produce(elsewhere, "nowrite", 1)


@pytest.mark.parametrize(("column", "message"), [
    (pa.array([True] * 10), "bool"),
    (pa.array(["a"] * 10), "string"),
    (pa.array([1, None] * 5, pa.uint16()), "has nulls"),
])
def test_columns_a_run_cannot_hold_are_refused(client: Client, column: pa.Array,
                                               message: str) -> None:
    with pytest.raises(pa.ArrowInvalid, match=message):
        with client.producer(EXP, "types") as producer:
            producer.send(events(0).append_column("flag", column))


@pytest.mark.parametrize("metadata", [b"not json", b'{"producer": "p"}', b'{"seq": -1}',
                                      b'{"producer": "p", "seq": 1, "color": 3}',
                                      b'{"retention": {"bytes": -5}}'])
def test_bad_producer_metadata(server: LclstreamServer, metadata: bytes) -> None:
    flights = raw_client(server.port)
    batch = events(0)
    writer, _ = flights.do_put(flight.FlightDescriptor.for_path(EXP, "live", "meta"),
                               batch.schema)
    with pytest.raises(pa.ArrowInvalid):
        writer.write_with_metadata(batch, pa.py_buffer(metadata))
        writer.close()
    with connect(f"grpc://127.0.0.1:{server.port}") as c:  # the server is fine
        produce(c, "meta", 1)


# -- consumers: bad requests, slow and vanishing consumers -------------------------------------


def test_bad_subscriptions(client: Client, server: LclstreamServer) -> None:
    produce(client, "bad", 2)
    with pytest.raises(pa.ArrowInvalid, match="beyond the end"):
        collect(client.subscribe(EXP, "bad", from_=500), 1)
    with pytest.raises(pa.ArrowKeyError, match="no live stream 'bda'.*Did you mean 'bad'"):
        collect(client.subscribe(EXP, "bda"), 1)
    flights = raw_client(server.port)
    for doc in [{"v": 1, "experiment": EXP, "stream": "bad", "from": "yesterday"},
                {"v": 1, "experiment": EXP, "stream": "bad", "group": "g"},
                {"v": 1, "experiment": EXP, "stream": "bad", "start": 0},
                {"v": 1, "experiment": "../etc", "stream": "bad"}]:
        with pytest.raises(pa.ArrowInvalid):
            flights.do_get(flight.Ticket(json.dumps(doc).encode())).read_all()
    with pytest.raises(flight.FlightUnauthorizedError, match="altered"):
        info = flights.get_flight_info(flight.FlightDescriptor.for_path(EXP, "live", "bad"))
        forged = info.endpoints[0].ticket.ticket.replace(b"earliest", b"latest\x20\x20")
        flights.do_get(flight.Ticket(forged)).read_all()


def test_stalled_consumer_does_not_hold_back_the_producer(client: Client,
                                                          server: LclstreamServer) -> None:
    def wide(first: int) -> pa.RecordBatch:
        return events(first, width=4096)  # 160 KiB

    with client.producer(EXP, "stall") as producer:
        producer.send(wide(0))
    stalled = client.subscribe(EXP, "stall")
    it = iter(stalled)
    next(it)  # connected, then it stops reading
    # 300 batches, 48 MiB: many times the 64 KiB ring and the connection's flow-control window.
    # A producer held back by the consumer would block here.
    with client.producer(EXP, "stall") as producer:
        for i in range(1, 301):
            producer.send(wide(10 * i))
    described = client.streams(EXP)[0]
    assert described["events"] == 3010 and described["consumers"] == 1
    rest = []
    for batch in it:  # the stalled consumer catches up from the segments on disk
        rest.append(batch)
        if sum(b.num_rows for b in rest) >= 3000:
            break
    stalled.close()
    assert indices(rest) == list(range(10, 3010))
    assert pa.Table.from_batches(rest).equals(
        pa.Table.from_batches([wide(10 * i) for i in range(1, 301)]))


def test_log_reads_back_every_batch_and_recovers_the_same_index(tmp_path: Path) -> None:
    from flight_server.live.log import SegmentLog

    log = SegmentLog(tmp_path, segment_bytes=8 * 1024)
    log.create(events(0).schema)
    for i in range(20):
        log.publish(log.append(events(10 * i), "p", i))
    log.take_unsynced().run()
    assert len(log.segments) > 3
    assert [indices([log.read(e)]) for e in log.entries] == \
        [list(range(10 * i, 10 * i + 10)) for i in range(20)]
    log.close()
    again = SegmentLog(tmp_path, segment_bytes=8 * 1024)
    assert [(e.offset, e.position, e.length, e.producer, e.seq) for e in again.entries] == \
        [(e.offset, e.position, e.length, e.producer, e.seq) for e in log.entries]
    assert [s.size for s in again.segments] == [s.path.stat().st_size for s in log.segments]


def test_consumer_that_disconnects_is_freed(client: Client) -> None:
    produce(client, "gone", 3)
    for _ in range(3):
        sub = client.subscribe(EXP, "gone")
        next(iter(sub))
        sub.close()
    deadline = time.monotonic() + 10
    while client.streams(EXP)[0]["consumers"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.streams(EXP)[0]["consumers"] == 0


def test_retention_drops_old_segments_and_says_so(client: Client) -> None:
    with client.producer(EXP, "kept", retention_bytes=64 * 1024) as producer:
        for i in range(200):
            producer.send(events(10 * i))
    deadline = time.monotonic() + 10
    while client.streams(EXP)[0]["first_offset"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    described = client.streams(EXP)[0]
    assert described["first_offset"] > 0
    assert described["bytes_on_disk"] <= 64 * 1024 + 32 * 1024 + 8 * 1024
    with pytest.raises(pa.ArrowKeyError, match="removed by retention"):
        collect(client.subscribe(EXP, "kept", from_=0), 1)
    got = collect(client.subscribe(EXP, "kept"), 2000 - described["first_offset"])
    assert indices(got) == list(range(described["first_offset"], 2000))


def test_retention_by_age(client: Client) -> None:
    with client.producer(EXP, "aged", retention_seconds=0.3) as producer:
        for i in range(40):
            producer.send(events(10 * i))
    time.sleep(0.4)
    with client.producer(EXP, "aged") as producer:  # a fresh segment, younger than the limit
        for i in range(40, 60):
            producer.send(events(10 * i))
    deadline = time.monotonic() + 10
    while client.streams(EXP)[0]["first_offset"] < 400 and time.monotonic() < deadline:
        time.sleep(0.05)
    described = client.streams(EXP)[0]
    assert 400 <= described["first_offset"] < 600
    assert described["retention"]["seconds"] == 0.3


# -- consumer groups --------------------------------------------------------------------------


def test_group_members_share_the_stream_exactly_once(client: Client) -> None:
    # Batches of a realistic size (1.3 MB): the server takes a member's next batch as gRPC's
    # flow control lets it send, so tiny ones would all go to whichever member asked first.
    with client.producer(EXP, "train") as producer:
        for i in range(20):
            producer.send(events(10 * i, width=32768))
    client.end_run(EXP, "train")
    seen: dict[str, list[int]] = {}
    together = threading.Barrier(2)

    def member(name: str) -> None:
        sub = client.subscribe(EXP, "train", group="ranks")
        seen[name] = []
        together.wait()
        for batch in sub:
            seen[name] += indices([batch])
            time.sleep(0.05)  # slow work: the other member joins before this one is done
            sub.commit()

    threads = [threading.Thread(target=member, args=(f"m{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(seen["m0"] + seen["m1"]) == list(range(200))
    assert seen["m0"] and seen["m1"], "both members must get work"
    [group] = client.streams(EXP)[0]["groups"]
    assert group == {"group": "ranks", "committed": 200, "lag": 0, "members": 0}


def test_member_that_never_commits_gives_its_batches_back(client: Client) -> None:
    produce(client, "lazy", 10)
    lazy = client.subscribe(EXP, "lazy", group="g")
    taken = collect(lazy, 30)  # three batches, never committed; then it disconnects
    assert indices(taken) == list(range(30))
    diligent = client.subscribe(EXP, "lazy", group="g")
    got = []
    for batch in diligent:
        got += indices([batch])
        diligent.commit()
        if len(got) >= 100:
            break
    diligent.close()
    assert sorted(got) == list(range(100)), "the lazy member's batches are delivered again"
    assert client.streams(EXP)[0]["groups"][0]["committed"] == 100


def test_member_that_restarts_resumes_after_the_last_commit(client: Client) -> None:
    produce(client, "resume", 10)
    first = client.subscribe(EXP, "resume", group="g")
    got = collect(first, 40, close=False)
    first.commit(20)  # processed two batches of the four it took, then it dies
    first.close()
    again = collect(client.subscribe(EXP, "resume", group="g"), 80)
    assert indices(got) == list(range(40))
    assert indices(again) == list(range(20, 100))  # at least once: 20..39 come again


def test_what_producers_dropped_upstream_is_listed_and_kept(client: Client,
                                                           server: LclstreamServer) -> None:
    """A bridge tells the server how many messages its full queue dropped; the listing sums the
    producers' latest counts; a count that is not one is refused."""
    with client.producer(EXP, "lossy", producer_id="bridge-a") as a, \
            client.producer(EXP, "lossy", producer_id="bridge-b") as b:
        a.send(events(0))
        a.dropped = 3
        a.send(events(10))
        b.dropped = 4
        b.send(events(20))
        a.dropped = 5
        a.send(events(30))
    assert client.streams(EXP)[0]["dropped_upstream"] == 9
    with pytest.raises(pa.ArrowInvalid, match="'dropped' must be an integer"):
        writer, reader = raw_client(server.port).do_put(
            flight.FlightDescriptor.for_path(EXP, "live", "lossy"), events(0).schema)
        writer.write_with_metadata(events(40), pa.py_buffer(b'{"dropped": -1}'))
        writer.close()
