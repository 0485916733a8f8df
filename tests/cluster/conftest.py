"""Cluster tests: a real PostgreSQL per module (started on a free port in a temp dir) and the
settings every test node runs with (fast heartbeats, small partitions)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flight_server.server import LclstreamServer
from tests.cluster.postgres import Postgres

# a node silent for 1.5 s is dead: the tests see the cluster react within seconds
CLUSTER = {"cluster": True, "heartbeat_s": 0.2, "node_timeout_s": 1.5,
           "partition_bytes": 512 << 10, "batch_bytes": 64 << 10,
           "first_batch_bytes": 16 << 10}


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres().init()
    yield pg
    pg.remove()


def location(server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"
