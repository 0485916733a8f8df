"""Dask: experiment runs as a lazy dask DataFrame, one partition per Flight endpoint.

    >>> from clients.dask import read_dask
    >>> df = read_dask("grpc://host:8815", "tmox42619", [7, 8], ["run", "gmd/energy"])
    >>> df.groupby("run")["gmd/energy"].mean().compute()

The plan (GetFlightInfo) is asked for once, where `read_dask` is called; each partition is one
DoGet of one endpoint's ticket, run on whichever worker computes it, so partitions stream from
the server to the workers in parallel and never pass through the client. The server's
`partition_bytes` setting decides how many endpoints, and so partitions, a request has.
Tensor columns are object columns holding one ndarray per event, as
`clients.convert.to_pandas` makes them.

On a cluster (`dask.distributed`): the workers connect to the Flight server themselves, so they
must reach its address and present a token. `token=` is carried inside the task graph to every
worker (the scheduler and workers see it: use a cluster you own). With `token=None`, each worker
looks for one itself: $LCLSTREAM_TOKEN in the worker's environment, else the keyring of the
user it runs as (`lclstream login` on a shared home directory). With dask-jobqueue on an HPC
batch system, set the variable in the job script, e.g.

    >>> from dask_jobqueue import SLURMCluster
    >>> cluster = SLURMCluster(cores=8, memory="32GB",
    ...                        job_script_prologue=[f"export LCLSTREAM_TOKEN={token}"])
    >>> cluster.scale(jobs=4)
    >>> client = distributed.Client(cluster)

or pass `token=` to `read_dask`. Other `connect_options` (TLS certificates as PEM bytes or paths
valid on the workers) are shipped the same way and must be picklable.

Near the data: a cluster of servers names, for each endpoint, the nodes that serve it (the
preferred one first). When dask computes on a `distributed.Client` whose workers are on several
hosts, some of them those nodes', `read_dask` submits each partition's read at once (as
`persist` would) to a worker on its endpoint's first node's host, or to any worker when none is
there or it is busy (`allow_other_workers`); the frame then holds the partitions in the
workers' memory. Only submitted tasks keep such a placement: dask DataFrames drop
`dask.annotate` from their graphs, and the scheduler places their read tasks wherever it likes.
So by default (`near_data=None`) reads are placed only for a request whose bytes (the plan's
`total_bytes`) take at most a quarter of the workers' memory; a larger one stays lazy, read as
it is computed, by any worker. `near_data=True` places whatever the size, `False` never.
"""

from __future__ import annotations

import functools
import socket
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import dask
import dask.base
import dask.dataframe as dd
import distributed
import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight

from clients.client import Client, Events, Runs, locations
from clients.convert import is_tensor, to_pandas

# Placed reads are held in the workers' memory: by default only a request this small a share
# of it (pandas frames take more than the Arrow bytes, and the workers compute on them too).
NEAR_DATA_SHARE = 0.25


def meta_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty pandas frame with the columns and dtypes `to_pandas` gives for `schema`."""
    frame = to_pandas(schema.empty_table())
    for field in schema:
        if is_tensor(field.type):
            frame[field.name] = frame[field.name].astype(object)
    return frame


class ReadTicket:
    """Picklable partition reader: connects on the worker and DoGets one ticket."""

    def __init__(self, location: str, schema: pa.Schema, token: str | None,
                 connect_options: dict[str, Any]) -> None:
        self.location, self.schema = location, schema
        self.token, self.connect_options = token, connect_options

    def __call__(self, part: tuple[bytes, list[str]]) -> pd.DataFrame:
        ticket, locations = part
        endpoint = flight.FlightEndpoint(ticket, [flight.Location(u) for u in locations])
        with Client(self.location, self.token, **self.connect_options) as client:
            batches = list(client.endpoint_reader(endpoint))
        table = pa.Table.from_batches(batches, schema=self.schema)
        return meta_frame(self.schema) if not len(table) else to_pandas(table)


@functools.lru_cache(maxsize=1024)
def _address(host: str) -> str:
    """`host`'s IPv4 address, so that a name and an address of one machine compare equal; the
    host itself when it does not resolve (or is IPv6)."""
    try:
        return socket.gethostbyname(host) if host else host
    except OSError:
        return host


def _near_data(reader: ReadTicket, parts: list[tuple[bytes, list[str]]],
               meta: pd.DataFrame, label: str, nbytes: int | None) -> dd.DataFrame | None:
    """The partitions submitted to workers on their first location's host (module docs), or
    None when dask would not compute on a distributed Client or no endpoint has a worker, or
    (`nbytes` given: the default) when the request's `nbytes` would not fit in
    NEAR_DATA_SHARE of the workers' memory."""
    try:
        client = getattr(dask.base.get_scheduler(), "__self__", None)
    except RuntimeError:  # an asynchronous Client, which dask.compute cannot use either
        return None
    if not isinstance(client, distributed.Client):
        return None
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if nbytes is not None:
        memory = [w.get("memory_limit") or 0 for w in workers]
        if nbytes < 0 or 0 in memory or nbytes > NEAR_DATA_SHARE * sum(memory):
            return None  # too big to hold (or of unknown size): lazy, read as computed
    hosts: dict[str, set[str]] = {}  # address -> the hosts of the workers there, as they say
    for worker in workers:
        hosts.setdefault(_address(worker["host"]), set()).add(worker["host"])
    if len(hosts) < 2:  # every worker on one machine (a LocalCluster): no choice to make
        return None
    # A host restriction (unlike a worker's address) also takes a worker restarted there.
    placed = [sorted(hosts.get(_address(urlsplit(locations[0]).hostname or ""), ()))
              if locations else [] for _, locations in parts]
    if not any(placed):
        return None
    name = f"{label}-{uuid.uuid4().hex}"
    futures = [client.submit(reader, part, key=(name, i), workers=where or None,
                             allow_other_workers=bool(where))
               for i, (part, where) in enumerate(zip(parts, placed, strict=True))]
    # no meta-checking task: another task, placed anywhere, would move each partition
    return dd.from_delayed(futures, meta=meta, verify_meta=False)


def read_dask(location: str, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
              *, events: Events = None, filter: str | None = None,
              processing: Sequence[dict[str, Any]] | None = None, token: str | None = None,
              near_data: bool | None = None, **connect_options: Any) -> dd.DataFrame:
    """A dask DataFrame of the requested events, one partition per endpoint of the plan, in
    event order (divisions unknown). Arguments as for `Client.read`; `token` and
    `connect_options` go to every worker (module docs). `near_data`: read each partition now,
    on a worker on its node's host where a distributed Client has one; None (the default):
    so if the request takes at most NEAR_DATA_SHARE of the workers' memory (module docs)."""
    with Client(location, token, **connect_options) as client:
        info = client.plan(experiment, runs, columns, events, filter=filter,
                           processing=processing)
    schema = info.schema
    meta = meta_frame(schema)
    # each partition: a ticket and the nodes that serve it (a cluster's), read there
    tickets = [(endpoint.ticket.ticket, locations(endpoint)) for endpoint in info.endpoints]
    if not tickets:
        return dd.from_pandas(meta, npartitions=1)
    reader = ReadTicket(location, schema, token, connect_options)
    # dask would turn the object columns, the tensors' ndarrays included, into strings
    label = f"lclstream-{experiment}"
    with dask.config.set({"dataframe.convert-string": False}):
        placed = None if near_data is False else _near_data(
            reader, tickets, meta, label, None if near_data else info.total_bytes)
        return placed if placed is not None else dd.from_map(reader, tickets, meta=meta,
                                                             label=label)
