"""Cluster tests: the settings every test node runs with (fast heartbeats, small partitions),
and nodes in processes of their own. Their state is the `postgres` fixture's real PostgreSQL
(tests/conftest.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flight_server.server import LclstreamServer
from tests.helpers import LCLSTREAM, cli_env, wait_for_location

# a node silent for 1.5 s is dead: the tests see the cluster react within seconds
CLUSTER = {"cluster": True, "heartbeat_s": 0.2, "node_timeout_s": 1.5,
           "partition_bytes": 512 << 10, "batch_bytes": 64 << 10,
           "first_batch_bytes": 16 << 10}


def location(server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


def serve(data: Path, state_url: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A node in a process of its own (to be killed), with the test settings; `args` go to
    `lclstream serve`. Its process and location."""
    env = cli_env(LCLSTREAM_HEARTBEAT_S=str(CLUSTER["heartbeat_s"]),
                  LCLSTREAM_NODE_TIMEOUT_S=str(CLUSTER["node_timeout_s"]),
                  LCLSTREAM_PARTITION_BYTES=str(CLUSTER["partition_bytes"]),
                  LCLSTREAM_BATCH_BYTES=str(CLUSTER["batch_bytes"]),
                  LCLSTREAM_JOB_PARTITION_BYTES=str(1 << 20))
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(data), "--port", "0",
                             "--cluster", "--state-url", state_url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    return proc, wait_for_location(proc)
