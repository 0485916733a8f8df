"""PyTorch: stream experiment runs into a DataLoader, sharded over workers and ranks.

    >>> from torch.utils.data import DataLoader
    >>> from clients.torch import FlightDataset
    >>> ds = FlightDataset("grpc://host:8815", "tmox42619", [7, 8], ["pnccd/image", "gmd/energy"],
    ...                    batch_size=64, shuffle_buffer=4096)
    >>> for epoch in range(3):
    ...     ds.set_epoch(epoch)
    ...     for batch in DataLoader(ds, batch_size=None, num_workers=4):
    ...         batch["pnccd/image"]          # uint16 tensor (64, 1, 128, 128)

Sharding. Each (rank, DataLoader worker) pair is one shard. The plan's endpoints (one per server
partition) are dealt round-robin to the shards, so every endpoint is read by exactly one shard
per epoch. The server's `partition_bytes` setting decides how many endpoints a request has: a
smaller value gives more, finer endpoints. When a plan has fewer endpoints than there are
shards, every shard reads every endpoint and keeps the events whose index in the plan is
`shard (mod shards)`: still disjoint and complete, no shard idle, at the price of each shard
receiving all the data.

Zero copy. Tensors are `torch.from_numpy` views of the received Arrow buffers
(`clients.convert.array_to_numpy`), one per batch and column; a yielded event or batch is a view
into them. Those buffers are read-only to NumPy, and torch would warn on each view; the warning
is silenced here because the tensors are meant to be read: `.clone()` one before writing to it
in place. With `num_workers > 0`, the DataLoader moves a worker's tensors to the main process
through shared memory, which costs its one copy of the underlying batch; in a worker, and
with `num_workers=0`, nothing is copied. Shuffling and batches that straddle two received
batches stack events into a new tensor (one copy).

Columns that are not fixed-size (strings, variable-length lists such as `peaks/var_x`) come as
Python lists: of `str`, or of 1-D tensors. Timestamps come as int64 nanoseconds since the epoch.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch
import torch.utils.data

from clients.client import Client, Events, Runs
from clients.convert import array_to_numpy

Column = torch.Tensor | list
Chunk = dict[str, Column]

_READ_ONLY = "The given NumPy array is not writable"


def _from_numpy(values: np.ndarray) -> torch.Tensor:
    """A tensor sharing `values`' memory; torch's read-only warning silenced (module docs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY, category=UserWarning)
        return torch.from_numpy(values)


def column_to_torch(arr: pa.Array) -> Column:
    """One Arrow column of a batch as a tensor of shape (events, *per-event shape), sharing the
    Arrow buffer where its layout allows (fixed-size numbers without nulls); other columns as a
    list of per-event values."""
    dtype = arr.type
    if pa.types.is_timestamp(dtype) or pa.types.is_duration(dtype):
        return _from_numpy(arr.to_numpy(zero_copy_only=False).view(np.int64))
    if pa.types.is_date(dtype) or pa.types.is_time(dtype):
        arr = arr.cast(pa.int64() if dtype.bit_width == 64 else pa.int32())
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return [None if v is None else _from_numpy(v) for v in arr.to_numpy(zero_copy_only=False)]
    values = array_to_numpy(arr)
    if values.dtype == object or values.dtype.kind in "USM":
        return arr.to_pylist()
    return _from_numpy(values)


def batch_to_torch(batch: pa.RecordBatch) -> Chunk:
    """Every column of a RecordBatch as `column_to_torch` gives it."""
    return {name: column_to_torch(col) for name, col in zip(batch.schema.names, batch.columns,
                                                            strict=True)}


def _length(chunk: Chunk) -> int:
    return len(next(iter(chunk.values()))) if chunk else 0


def _slice(chunk: Chunk, start: int, stop: int | None = None, step: int = 1) -> Chunk:
    return {k: v[start:stop:step] for k, v in chunk.items()}


def _cat(chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return {k: (torch.cat([c[k] for c in chunks]) if isinstance(chunks[0][k], torch.Tensor)
                else [x for c in chunks for x in c[k]]) for k in chunks[0]}


def _stack(events: list[Chunk], ragged: set[str]) -> Chunk:
    """Events as one batch: fixed-size columns stacked, the others (`ragged`: variable-length
    lists, strings) as lists, whatever sizes this batch's events happen to have."""
    return {k: ([e[k] for e in events] if k in ragged or not isinstance(events[0][k], torch.Tensor)
                else torch.stack([e[k] for e in events])) for k in events[0]}


def _ragged(schema: pa.Schema) -> set[str]:
    """The columns that come as lists of per-event values (see `column_to_torch`)."""
    return {f.name for f in schema
            if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
            or pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}


def _events_of(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    for chunk in chunks:
        for i in range(_length(chunk)):
            yield {k: v[i] for k, v in chunk.items()}


def _rebatch(chunks: Iterator[Chunk], size: int, drop_last: bool) -> Iterator[Chunk]:
    """Batches of `size` events; a batch inside one chunk stays a view, one across chunks is
    joined (one copy)."""
    pending: list[Chunk] = []
    have = 0
    for chunk in chunks:
        n, start = _length(chunk), 0
        while start < n:
            take = min(size - have, n - start)
            piece = _slice(chunk, start, start + take)
            start += take
            pending.append(piece)
            have += take
            if have == size:
                yield _cat(pending)
                pending, have = [], 0
    if pending and not drop_last:
        yield _cat(pending)


def _shuffled(items: Iterator[Chunk], size: int, rng: random.Random) -> Iterator[Chunk]:
    """A bounded shuffle: hold `size` items, emit a random one as each new one arrives."""
    buffer: list[Chunk] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class _OneEndpoint:
    """A plan of one endpoint: `Client.batches` reads only `endpoints`."""

    def __init__(self, endpoint: flight.FlightEndpoint) -> None:
        self.endpoints = [endpoint]


def _endpoint_batches(client: Client, endpoint: flight.FlightEndpoint
                      ) -> Iterator[pa.RecordBatch]:
    """One endpoint's batches, with the client's error cleaning."""
    return client.batches(_OneEndpoint(endpoint))  # type: ignore[arg-type]


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size): from torch.distributed when it is initialised, else $RANK and
    $WORLD_SIZE (as torchrun sets them), else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class FlightDataset(torch.utils.data.IterableDataset):
    """Events of experiment runs streamed from a LCLStream Flight server, for a DataLoader.

    Yields one dict {column: tensor} per event, or with `batch_size` one dict of tensors with a
    leading batch dimension (use `DataLoader(ds, batch_size=None)` then). `shuffle_buffer > 0`
    shuffles within a window of that many events (and the endpoints' order), seeded by
    `seed + epoch`; call `set_epoch` before each epoch. The rank and world size are taken when
    the dataset is made: make it after `torch.distributed.init_process_group`, or pass them.
    The token: `token=`, else $LCLSTREAM_TOKEN, else the keyring, looked up in each worker.
    """

    def __init__(self, location: str, experiment: str, runs: Runs,
                 columns: Sequence[str] | None, *, events: Events = None,
                 filter: str | None = None, processing: Sequence[dict[str, Any]] | None = None,
                 shuffle_buffer: int = 0, seed: int = 0, batch_size: int | None = None,
                 drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, token: str | None = None,
                 **connect_options: Any) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be a positive integer or None")
        self.location, self.experiment, self.runs = location, experiment, runs
        self.columns, self.events = columns, events
        self.filter = filter
        self.processing = None if processing is None else [dict(s) for s in processing]
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.batch_size, self.drop_last = batch_size, drop_last
        found_rank, found_size = distributed_rank()
        self.rank = found_rank if rank is None else rank
        self.world_size = found_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in range(world_size={self.world_size})")
        self.token, self.connect_options = token, connect_options
        self._info: flight.FlightInfo | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for `epoch`. Workers copy the dataset when an epoch's iterator
        starts, so this reaches them unless the DataLoader has `persistent_workers=True`."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_info"] = None  # each worker plans for itself
        return state

    def shard(self) -> tuple[int, int]:
        """(this shard, number of shards) for the calling DataLoader worker."""
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return self.rank * workers + worker_id, self.world_size * workers

    def plan(self, client: Client) -> flight.FlightInfo:
        """The request's FlightInfo, asked for once per process."""
        if self._info is None:
            self._info = client.plan(self.experiment, self.runs, self.columns, self.events,
                                     filter=self.filter, processing=self.processing)
        return self._info

    def __iter__(self) -> Iterator[Chunk]:
        shard, shards = self.shard()
        rng = random.Random(f"{self.seed + self.epoch}:{shard}")
        with Client(self.location, self.token, **self.connect_options) as client:
            chunks = self._chunks(client, shard, shards)
            ragged = _ragged(self.plan(client).schema)
            if self.shuffle_buffer > 0:
                items = _shuffled(_events_of(chunks), self.shuffle_buffer, rng)
                if self.batch_size is None:
                    yield from items
                    return
                group: list[Chunk] = []
                for item in items:
                    group.append(item)
                    if len(group) == self.batch_size:
                        yield _stack(group, ragged)
                        group = []
                if group and not self.drop_last:
                    yield _stack(group, ragged)
            elif self.batch_size is None:
                yield from _events_of(chunks)
            else:
                yield from _rebatch(chunks, self.batch_size, self.drop_last)

    def _chunks(self, client: Client, shard: int, shards: int) -> Iterator[Chunk]:
        """This shard's events, as views of each received batch."""
        endpoints = list(self.plan(client).endpoints)
        if self.shuffle_buffer > 0:  # the same order on every shard: a permutation of all
            random.Random(self.seed + self.epoch).shuffle(endpoints)
        if len(endpoints) >= shards:
            for endpoint in endpoints[shard::shards]:
                for batch in _endpoint_batches(client, endpoint):
                    yield batch_to_torch(batch)
            return
        index = 0  # the event's position in the plan: shard `index % shards` keeps it
        for endpoint in endpoints:
            for batch in _endpoint_batches(client, endpoint):
                first = (shard - index) % shards
                if first < batch.num_rows:
                    yield _slice(batch_to_torch(batch), first, None, shards)
                index += batch.num_rows
