"""A bridge across a server's kill -9: the bridge (its own process) goes on receiving, its
producer resends what was not acknowledged once the server is back, and the stream holds every
event exactly once."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from clients import connect
from tests.helpers import EXP, LCLSTREAM, cli_env, free_port, interrupt
from tests.live.bridges.messages import lclstreamer_message
from tests.live.test_live_faults import Server

MESSAGES, EVENTS = 120, 10


@pytest.mark.slow
def test_kill_9_of_the_server_while_bridging_loses_and_repeats_nothing(tmp_path: Path) -> None:
    (tmp_path / "data" / EXP).mkdir(parents=True)
    server = Server(tmp_path / "data", free_port(), tmp_path / "server.log")
    location = server.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    bridge = subprocess.Popen(
        [*LCLSTREAM, "bridge", "lclstreamer-hdf5", "--connect", f"tcp://127.0.0.1:{port}",
         "--into", f"{EXP}/survivor", "--batch-events", "20", "--messages", str(MESSAGES),
         "--producer-id", "bridge-survivor", "--server", location],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())

    def send() -> None:  # a detector's steady pace: 120 messages over about 3 s
        for i in range(MESSAGES):
            fields = {"timestamp": np.arange(i * EVENTS, (i + 1) * EVENTS, dtype=np.uint64),
                      "gmd/energy": np.full(EVENTS, i, dtype=np.float32)}
            push.send(lclstreamer_message(fields))
            time.sleep(0.025)

    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        time.sleep(1.0)
        server.kill()  # mid-stream, batches in flight
        time.sleep(0.5)
        server.start()
        sender.join(60)
        out, err = bridge.communicate(timeout=120)
        assert bridge.returncode == 0, err
        assert f"{MESSAGES} messages received" in out and "0 messages dropped" in out
        with connect(location) as client:
            table = client.read_stream(EXP, "survivor")
        stamps = np.sort(table.column("timestamp").to_numpy())
        np.testing.assert_array_equal(stamps, np.arange(MESSAGES * EVENTS, dtype=np.uint64))
    finally:
        if bridge.poll() is None:
            interrupt(bridge)
        push.close(0)
        server.stop()
