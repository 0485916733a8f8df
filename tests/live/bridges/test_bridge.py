"""The bridge end to end: a real ZMQ sender, the bridge, a real server; what a subscriber reads
back equals what was sent. The bounded queue drops and counts, bad messages are skipped, a
schema change is refused naming the column, a sender that goes away and comes back is
followed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zmq

from clients import Client, connect
from flight_server.live.bridges.bridge import Bridge, Queue, make_format
from flight_server.server import LclstreamServer
from tests.helpers import EXP, admin_token, free_port, run_cli, start_server
from tests.live.bridges.messages import lclstreamer_message

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bridge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LclstreamServer]:
    root = tmp_path_factory.mktemp("bridge-data")
    (root / EXP).mkdir()
    srv = start_server(root)
    yield srv
    srv.shutdown()


@pytest.fixture
def client(bridge_server: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{bridge_server.port}", admin_token()) as c:
        yield c


def sender(endpoint: str, bind: bool = False) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    (sock.bind if bind else sock.connect)(endpoint)
    return sock


def start_bridge(client: Client, stream: str, endpoint: str, **options) -> tuple[Bridge, dict]:
    producer = client.producer(EXP, stream, producer_id=f"bridge-{stream}")
    bridge = Bridge(make_format("lclstreamer-hdf5"), producer, endpoint, bind=True,
                    linger=0.05, **options)
    out: dict = {}

    def run() -> None:
        try:
            out["stats"] = bridge.run()
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    assert bridge.ready.wait(10)
    return bridge, out


def finish(bridge: Bridge, out: dict, until: int | None = None) -> None:
    deadline = time.monotonic() + 30
    while until is not None and bridge.stats.received < until and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    bridge.stop()
    out["thread"].join(30)
    if "error" in out:
        raise out["error"]
    bridge.producer.close()


def messages(n: int, events: int = 5, seed: int = 0) -> list[tuple[bytes, dict]]:
    rng = np.random.default_rng(seed)
    made = []
    for i in range(n):
        fields = {
            "timestamp": np.arange(i * events, (i + 1) * events, dtype=np.uint64),
            "gmd/energy": rng.random(events).astype(np.float32),
            "detector/frame": rng.integers(0, 4000, (events, 8, 16), dtype=np.uint16),
        }
        made.append((lclstreamer_message(fields), fields))
    return made


def expected_table(sent: list[tuple[bytes, dict]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for _, f in sent]) for name in sent[0][1]}


def assert_stream_holds(client: Client, stream: str, expected: dict[str, np.ndarray]) -> None:
    table = client.read_stream(EXP, stream)
    for name, values in expected.items():
        column = table.column(name).combine_chunks()
        got = column.to_numpy_ndarray() if isinstance(column.type, pa.BaseExtensionType) \
            else np.asarray(column.to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got, values, err_msg=name)


def test_what_is_sent_is_what_the_stream_holds(client: Client) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bridge, out = start_bridge(client, "daq", endpoint, batch_events=12)
    sent = messages(20)
    with sender(endpoint) as push:
        for raw, _ in sent:
            push.send(raw)
        finish(bridge, out, until=len(sent))
    stats = out["stats"]
    assert (stats.received, stats.events, stats.dropped, stats.bad) == (20, 100, 0, 0)
    assert stats.batches >= 7  # 15 events (3 messages) make a batch of 12 or more
    assert_stream_holds(client, "daq", expected_table(sent))
    listed = [s for s in client.streams(EXP) if s["stream"] == "daq"][0]
    assert listed["events"] == 100 and listed["dropped_upstream"] == 0


def test_bad_messages_are_counted_and_skipped(client: Client) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bridge, out = start_bridge(client, "noisy", endpoint)
    sent = messages(6)
    garbage = [b"not an hdf5 file", sent[0][0][: len(sent[0][0]) // 2], b""]
    with sender(endpoint) as push:
        for i, (raw, _) in enumerate(sent):
            push.send(raw)
            if i < len(garbage):
                push.send(garbage[i])
        finish(bridge, out, until=len(sent) + len(garbage))
    stats = out["stats"]
    assert stats.bad == 3 and stats.events == 30 and sum(stats.bad_reasons.values()) == 3
    assert_stream_holds(client, "noisy", expected_table(sent))


def test_a_schema_change_is_refused_and_the_stream_stays_intact(client: Client) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bridge, out = start_bridge(client, "fixed", endpoint)
    good = messages(4)
    wrong = {"timestamp": np.arange(3, dtype=np.uint64),
             "gmd/energy": np.ones(3, dtype=np.float64),  # was float32
             "detector/frame": np.zeros((3, 8, 16), dtype=np.uint16)}
    with sender(endpoint) as push:
        for raw, _ in good[:2]:
            push.send(raw)
        time.sleep(0.5)  # sent apart, so that each is a batch of its own
        push.send(lclstreamer_message(wrong))
        time.sleep(0.5)
        for raw, _ in good[2:]:
            push.send(raw)
        finish(bridge, out, until=5)
    stats = out["stats"]
    assert stats.refused == 3 and "gmd/energy" in stats.last_error
    assert stats.events == 20
    assert_stream_holds(client, "fixed", expected_table(good))


def test_a_full_queue_drops_counts_and_tells_the_server(client: Client) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    slow = threading.Event()
    bridge, out = start_bridge(client, "overflow", endpoint, batch_events=5,
                               queue=Queue(max_messages=4),
                               on_batch=lambda _: slow.wait(0.05))  # a server that lags
    sent = messages(60)
    with sender(endpoint) as push:
        for raw, _ in sent:
            push.send(raw)
        finish(bridge, out, until=len(sent))
    stats = out["stats"]
    assert stats.received == 60 and stats.dropped > 0
    assert stats.events == 5 * (60 - stats.dropped)  # every message kept arrived whole
    listed = [s for s in client.streams(EXP) if s["stream"] == "overflow"][0]
    assert listed["dropped_upstream"] == stats.dropped
    assert listed["events"] == stats.events


def test_a_sender_that_goes_away_and_comes_back(client: Client) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bridge, out = start_bridge(client, "flaky", endpoint)
    sent = messages(10)
    with sender(endpoint) as push:
        for raw, _ in sent[:5]:
            push.send(raw)
    time.sleep(0.3)  # the sender is gone
    with sender(endpoint) as push:
        for raw, _ in sent[5:]:
            push.send(raw)
        finish(bridge, out, until=10)
    assert out["stats"].events == 50
    assert_stream_holds(client, "flaky", expected_table(sent))


def test_the_command_line_bridge(bridge_server: LclstreamServer, client: Client,
                                 tmp_path: Path) -> None:
    port = free_port()
    sent = messages(8)
    push = sender(f"tcp://127.0.0.1:{port}", bind=True)
    # A PUSH socket holds its messages until a peer connects: the bridge, started below.
    sending = threading.Thread(target=lambda: [push.send(raw) for raw, _ in sent], daemon=True)
    sending.start()
    try:
        res = run_cli("bridge", "lclstreamer-hdf5", "--connect", f"tcp://127.0.0.1:{port}",
                      "--into", f"{EXP}/cli", "--messages", "8", "--server",
                      f"grpc://127.0.0.1:{bridge_server.port}", timeout=60)
        sending.join(10)
    finally:
        push.close(0)
    assert res.returncode == 0, res.stderr
    assert "8 messages received" in res.stdout and "40 events sent" in res.stdout
    assert_stream_holds(client, "cli", expected_table(sent))


def test_what_a_stream_cannot_store_is_adapted_or_left_out(client: Client) -> None:
    """A live stream ends as a run file, which stores numbers: booleans arrive as uint8, a
    float `timestamp` (the seed's psana time) as `sent/timestamp`, text is left out."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bridge, out = start_bridge(client, "mixed", endpoint)
    fields = {"timestamp": np.linspace(1.7e9, 1.7e9 + 1, 4),
              "laser/on": np.array([True, False, True, True]),
              "gmd/energy": np.arange(4, dtype=np.float32)}
    with sender(endpoint) as push:
        push.send(lclstreamer_message(fields))
        finish(bridge, out, until=1)
    table = client.read_stream(EXP, "mixed")
    assert table.schema.field("laser/on").type == pa.uint8()
    assert table.column("laser/on").to_pylist() == [1, 0, 1, 1]
    assert table.column("sent/timestamp").to_pylist() == fields["timestamp"].tolist()
    assert table.column("gmd/energy").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    assert out["stats"].events == 4 and out["stats"].refused == 0


def test_karabo_trains_through_a_req_bridge(client: Client) -> None:
    """karabo_bridge's own server (REP, what a Karabo bridge device offers) fed three trains
    with text, booleans and lists beside the frames; the bridge asks for each, and the stream
    holds every number as fed, booleans as uint8, text left out."""
    from karabo_bridge import ServerInThread

    from tests.live.bridges.messages import KARABO_DETECTOR, KARABO_MOTOR, karabo_train

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    trains = [karabo_train(500 + i) for i in range(3)]
    with ServerInThread(endpoint, sock="REP") as server:
        for data, meta in trains:
            server.feed(data, meta)
        producer = client.producer(EXP, "karabo", producer_id="bridge-karabo")
        bridge = Bridge(make_format("karabo-bridge"), producer, endpoint, linger=0.05)
        stats = bridge.run(max_messages=3)
        producer.close()
    assert (stats.received, stats.events, stats.refused, stats.bad) == (3, 3, 0, 0)
    assert f"{KARABO_MOTOR}/state" in stats.left_out
    table = client.read_stream(EXP, "karabo")
    assert table.column("trainId").to_pylist() == [500, 501, 502]
    frames = table.column(f"{KARABO_DETECTOR}/image.data").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(frames, np.stack([d[KARABO_DETECTOR]["image.data"]
                                                    for d, _ in trains]))
    assert table.column(f"{KARABO_MOTOR}/actualPosition").to_pylist() == \
        [d[KARABO_MOTOR]["actualPosition"] for d, _ in trains]
    assert table.column(f"{KARABO_MOTOR}/isMoving").to_pylist() == [0, 0, 0]
    assert f"{KARABO_MOTOR}/state" not in table.column_names


def test_a_bridge_without_the_write_grant_stops_and_says_so(bridge_server: LclstreamServer,
                                                           client: Client) -> None:
    from tests.jobs.conftest import token_for

    port = free_port()
    push = sender(f"tcp://127.0.0.1:{port}", bind=True)
    sending = threading.Thread(target=lambda: [push.send(raw) for raw, _ in messages(3)],
                               daemon=True)
    sending.start()
    try:
        res = run_cli("bridge", "lclstreamer-hdf5", "--connect", f"tcp://127.0.0.1:{port}",
                      "--into", f"{EXP}/not-mine", "--messages", "3", "--server",
                      f"grpc://127.0.0.1:{bridge_server.port}",
                      "--token", token_for("eve", read=(EXP,)), timeout=60)
    finally:
        push.close(0)
    assert res.returncode == 1
    assert f"not allowed to write {EXP}/not-mine" in res.stderr
    assert not [s for s in client.streams(EXP) if s["stream"] == "not-mine"]
