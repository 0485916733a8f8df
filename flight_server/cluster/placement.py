"""Which nodes serve a plan's endpoints: rendezvous (highest-random-weight) hashing of each
partition over the live nodes, with bounded loads. A partition goes to the node that ranks it
highest, so the same events go to the same node (whose page cache has them) and a node that
leaves moves only its own partitions; but no node takes more than its share of one plan, plus a
quarter (pure hashing gave one node 9 of 16 endpoints and another 2), the rest going to their
next-ranked node. Each endpoint also names a fallback: the next node in its ranking."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

SLACK = 1.25  # a node's share of a plan, at most: fair share x this


def ranked(key: str, nodes: Sequence[str]) -> list[str]:
    """`nodes` (their locations) in the order they should serve `key`."""
    def weight(node: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{node}".encode(), digest_size=8).digest()

    return sorted(nodes, key=weight, reverse=True)


def spread(keys: Sequence[str], nodes: Sequence[str], copies: int = 2) -> list[list[str]]:
    """For each partition of a plan, the node that serves it first, then its fallback(s)."""
    if not nodes:
        return [[] for _ in keys]
    cap = math.ceil(len(keys) / len(nodes) * SLACK)
    load = dict.fromkeys(nodes, 0)
    placed = []
    for key in keys:
        order = ranked(key, nodes)
        first = next((n for n in order if load[n] < cap), order[0])
        load[first] += 1
        placed.append([first, *[n for n in order if n != first][:copies - 1]])
    return placed
