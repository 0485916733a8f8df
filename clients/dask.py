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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight

from clients.client import Client, Events, Runs
from clients.convert import is_tensor, to_pandas


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


def read_dask(location: str, experiment: str, runs: Runs, columns: Sequence[str] | None = None,
              *, events: Events = None, filter: str | None = None,
              processing: Sequence[dict[str, Any]] | None = None, token: str | None = None,
              **connect_options: Any) -> dd.DataFrame:
    """A dask DataFrame of the requested events, one partition per endpoint of the plan, in
    event order (divisions unknown). Arguments as for `Client.read`; `token` and
    `connect_options` go to every worker (module docs)."""
    with Client(location, token, **connect_options) as client:
        info = client.plan(experiment, runs, columns, events, filter=filter,
                           processing=processing)
    schema = info.schema
    meta = meta_frame(schema)
    # each partition: a ticket and the nodes that serve it (a cluster's), read there
    tickets = [(endpoint.ticket.ticket, [loc.uri.decode() for loc in endpoint.locations])
               for endpoint in info.endpoints]
    if not tickets:
        return dd.from_pandas(meta, npartitions=1)
    reader = ReadTicket(location, schema, token, connect_options)
    # dask would turn the object columns, the tensors' ndarrays included, into strings
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(reader, tickets, meta=meta, label=f"lclstream-{experiment}")
