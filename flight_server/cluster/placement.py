"""Which nodes serve an endpoint: rendezvous (highest-random-weight) hashing of the partition
over the live nodes. The same partition goes to the same node as long as that node lives, so its
page cache stays warm for the next reader; when a node leaves, only its partitions move, each to
the node that was already its fallback."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def ranked(key: str, nodes: Sequence[str]) -> list[str]:
    """`nodes` (their locations) in the order they should serve `key`."""
    def weight(node: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{node}".encode(), digest_size=8).digest()

    return sorted(nodes, key=weight, reverse=True)


def locations(key: str, nodes: Sequence[str], copies: int = 2) -> list[str]:
    """The node that serves `key` first, then its fallback(s)."""
    return ranked(key, nodes)[:copies]
