"""Live streams survive the server: kill -9 during ingest, restart, and nothing acknowledged is
lost, nothing resent is stored twice, consumers and groups carry on without a gap."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from clients import connect
from tests.helpers import (
    EXP,
    LCLSTREAM,
    cli_env,
    events,
    free_port,
    indices,
    interrupt,
    start_server,
    wait_for_location,
)

BATCHES = 240
WIDTH = 4096  # 16 KiB waveforms per event: ~160 KiB batches, so the kill lands mid-ingest


class Server:
    """`lclstream serve` in its own process, so that it can be killed like a real one."""

    def __init__(self, data: Path, port: int, log: Path) -> None:
        self.data, self.port, self.log = data, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [*LCLSTREAM, "serve", "--data", str(self.data), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=self.log.open("a"), text=True,
            env=cli_env(LCLSTREAM_LIVE_FSYNC_INTERVAL="0.02"))
        return wait_for_location(self.proc)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc:
            interrupt(self.proc)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    (tmp_path / "data" / EXP).mkdir(parents=True)
    srv = Server(tmp_path / "data", free_port(), tmp_path / "server.log")
    yield srv
    srv.stop()


def test_kill_9_during_ingest_loses_nothing_acknowledged(server: Server) -> None:
    location = server.start()
    client = connect(location)
    producer = client.producer(EXP, "crash", producer_id="daq-7")
    tailed: list[pa.RecordBatch] = []
    grouped: list[pa.RecordBatch] = []
    problems: list[BaseException] = []

    def tail() -> None:
        try:
            tailed.extend(client.subscribe(EXP, "crash"))
        except BaseException as exc:
            problems.append(exc)

    def member() -> None:
        try:
            sub = client.subscribe(EXP, "crash", group="workers")
            for batch in sub:
                grouped.append(batch)
                sub.commit()
        except BaseException as exc:
            problems.append(exc)

    sent = [events(10 * i, width=WIDTH) for i in range(BATCHES)]
    producer.send(sent[0])
    producer.flush()
    consumers = [threading.Thread(target=tail), threading.Thread(target=member)]
    for t in consumers:
        t.start()
    acked_at_kill = None
    for i, batch in enumerate(sent[1:], start=1):
        producer.send(batch)
        if i == BATCHES // 2:
            producer.flush()  # some batches certainly acknowledged ...
            for extra in sent[i + 1:i + 20]:  # ... and some certainly in flight
                producer.send(extra)
            acked_at_kill = producer.last_ack
            server.kill()
            server.start()  # same data, same port
            for extra in sent[i + 20:]:
                producer.send(extra)
            break
    producer.close()
    assert producer.reconnects >= 1, "the producer must have lost its connection and resent"
    client.end_run(EXP, "crash")
    for t in consumers:
        t.join(timeout=60)
    assert not problems, problems

    expected = pa.Table.from_batches(sent)
    stored = client.read(EXP, 1, columns=expected.column_names)
    assert stored.equals(expected.cast(stored.schema)), "every batch once, bit-identical"
    assert acked_at_kill is not None and acked_at_kill.offset >= 10 * (BATCHES // 2)
    assert indices(tailed) == list(range(10 * BATCHES)), "the tailing consumer has no gap"
    seen = indices(grouped)
    assert set(seen) == set(range(10 * BATCHES)), "the group saw everything"
    # At least once: only what was delivered but not committed when the server died comes
    # twice, which is at most what was in flight to the member.
    assert len(seen) - len(set(seen)) <= 10 * 64
    client.close()


def test_torn_tail_is_cut_and_the_stream_goes_on(tmp_path: Path) -> None:
    (tmp_path / EXP).mkdir()
    srv = start_server(tmp_path)
    threading.Thread(target=srv.serve, daemon=True).start()
    with connect(f"grpc://127.0.0.1:{srv.port}") as c:
        with c.producer(EXP, "torn") as producer:
            for i in range(5):
                producer.send(events(10 * i))
    srv.shutdown()
    [segment] = (tmp_path / EXP / "live" / "torn" / "segments").iterdir()
    whole = segment.stat().st_size
    # What a server killed halfway through writing a message leaves behind.
    with segment.open("ab") as f:
        f.write(events(50).serialize().to_pybytes()[:700])
    srv = start_server(tmp_path)
    threading.Thread(target=srv.serve, daemon=True).start()
    try:
        assert segment.stat().st_size == whole
        with connect(f"grpc://127.0.0.1:{srv.port}") as c:
            assert c.streams(EXP)[0]["events"] == 50
            with c.producer(EXP, "torn") as producer:
                producer.send(events(50))
            assert producer.last_ack.offset == 50
            got = []
            for batch in c.subscribe(EXP, "torn"):
                got.append(batch)
                if len(got) == 6:
                    break
            assert indices(got) == list(range(60))
    finally:
        srv.shutdown()


def test_ctrl_c_ends_live_calls_and_clients_resume(server: Server) -> None:
    """A stopping server does not wait for its subscribers (they would never leave): it ends
    their calls, and they resume once it is back; a producer mid-stream resends."""
    location = server.start()
    client = connect(location)
    with client.producer(EXP, "restart") as producer:
        producer.send(events(0))
    got: list[pa.RecordBatch] = []
    problems: list[BaseException] = []

    def follow() -> None:
        try:
            got.extend(client.subscribe(EXP, "restart"))
        except BaseException as exc:
            problems.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    producer = client.producer(EXP, "restart")
    producer.send(events(10))
    producer.flush()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=30) == 0, "the server must stop with a subscriber connected"
    server.start()
    producer.send(events(20))
    producer.close()
    client.end_run(EXP, "restart")
    follower.join(timeout=60)
    assert not problems, problems
    assert indices(got) == list(range(30))
    client.close()
