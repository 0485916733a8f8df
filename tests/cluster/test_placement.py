"""Where a plan's endpoints go: the same partition to the same node while it lives, shares
bounded, a fallback that is another node, and a departed node's partitions only moving."""

from __future__ import annotations

import math
from collections import Counter

from flight_server.cluster.placement import SLACK, spread

NODES = [f"grpc://dtn{i:02d}:8815" for i in range(3)]
KEYS = [f"tmox42619/7///{i * 100}:{(i + 1) * 100}:1" for i in range(16)]


def test_each_endpoint_has_a_first_node_and_another_as_fallback() -> None:
    placed = spread(KEYS, NODES)
    assert all(len(p) == 2 and p[0] != p[1] and set(p) <= set(NODES) for p in placed)
    assert spread(KEYS, NODES) == placed  # stable: any node plans alike


def test_no_node_takes_more_than_its_share() -> None:
    for n in (4, 16, 64):
        keys = [f"run/{i}" for i in range(n)]
        load = Counter(p[0] for p in spread(keys, NODES))
        assert max(load.values()) <= math.ceil(n / len(NODES) * SLACK)
        assert set(load) == set(NODES) or n < len(NODES)


def test_a_node_that_leaves_moves_only_its_own_partitions() -> None:
    keys = [f"run/{i}" for i in range(300)]
    before = spread(keys, NODES)
    after = spread(keys, NODES[:2])
    moved = sum(b[0] != a[0] for b, a in zip(before, after, strict=True))
    gone = sum(b[0] == NODES[2] for b in before)
    # the departed node's partitions move; of the others, only the few a bound pushed aside
    assert gone <= moved <= gone * 1.3


def test_one_node_and_none() -> None:
    assert spread(KEYS[:2], NODES[:1]) == [[NODES[0]], [NODES[0]]]
    assert spread(KEYS[:2], []) == [[], []]
