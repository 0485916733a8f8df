"""SQL over Flight SQL with plain pyarrow.flight: no driver needed for `Client.sql`.

A query without parameters is one GetFlightInfo (CommandStatementQuery) and a DoGet per
endpoint. With parameters it is a prepared statement: CreatePreparedStatement, a DoPut of the
parameter row(s) that returns the bound handle, GetFlightInfo, DoGet, and ClosePreparedStatement.
ADBC, JDBC and ODBC drivers speak the same protocol (see README, "SQL and BI tools").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

import schemas.flight_sql as fsql

Params = Sequence[Any] | Sequence[Sequence[Any]] | pa.Table | pa.RecordBatch | None


def parameter_table(params: Params) -> pa.Table | None:
    """Parameters as Flight SQL sends them: one column per `?`, one row per execution."""
    if params is None:
        return None
    if isinstance(params, pa.RecordBatch):
        return pa.Table.from_batches([params])
    if isinstance(params, pa.Table):
        return params
    if isinstance(params, Mapping):
        raise TypeError("parameters are positional (`?`): pass a list of values")
    rows = [list(r) for r in params] if params and isinstance(params[0], list | tuple) \
        else [list(params)]
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("every parameter row must have the same number of values")
    return pa.table({str(i + 1): [r[i] for r in rows] for i in range(width)})


def statement_info(client: flight.FlightClient, query: str,
                   params: Params = None) -> tuple[flight.FlightInfo, bytes | None]:
    """The query's plan, and the prepared statement handle to close (None without params)."""
    parameters = parameter_table(params)
    if parameters is None:
        command = fsql.CommandStatementQuery(query=query)
        return client.get_flight_info(flight.FlightDescriptor.for_command(fsql.pack(command))), None
    request = fsql.ActionCreatePreparedStatementRequest(query=query)
    [result] = list(client.do_action(flight.Action("CreatePreparedStatement",
                                                   fsql.pack(request))))
    prepared = fsql.unpack(result.body.to_pybytes())
    handle = prepared.prepared_statement_handle
    command = fsql.CommandPreparedStatementQuery(prepared_statement_handle=handle)
    writer, metadata = client.do_put(flight.FlightDescriptor.for_command(fsql.pack(command)),
                                     parameters.schema)
    writer.write_table(parameters)
    writer.done_writing()
    reply = metadata.read()
    writer.close()
    bound = fsql.DoPutPreparedStatementResult.FromString(reply.to_pybytes()) if reply else None
    if bound is not None and bound.HasField("prepared_statement_handle"):
        command = fsql.CommandPreparedStatementQuery(
            prepared_statement_handle=bound.prepared_statement_handle)
    descriptor = flight.FlightDescriptor.for_command(fsql.pack(command))
    return client.get_flight_info(descriptor), handle


def close_statement(client: flight.FlightClient, handle: bytes) -> None:
    request = fsql.ActionClosePreparedStatementRequest(prepared_statement_handle=handle)
    list(client.do_action(flight.Action("ClosePreparedStatement", fsql.pack(request))))


def result_batches(client: flight.FlightClient,
                   info: flight.FlightInfo) -> Iterator[pa.RecordBatch]:
    for endpoint in info.endpoints:
        for chunk in client.do_get(endpoint.ticket):
            yield chunk.data


def adbc_connect(location: str, token: str | None = None, *, tls_root_certs: Any = None,
                 cert_chain: Any = None, private_key: Any = None, **db_kwargs: Any):
    """An ADBC DB-API connection (for polars.read_database, pandas.read_sql, ...) with the
    token found as `connect` finds it (argument, $LCLSTREAM_TOKEN, keyring) and the same TLS
    options (PEM text or file paths)."""
    import adbc_driver_flightsql.dbapi as dbapi
    from adbc_driver_flightsql import DatabaseOptions

    from clients import credentials

    token = credentials.find_token(location, token)
    if token:
        credentials.check_not_expired(location, token)
        db_kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {token}"
    tls = credentials.tls_options(tls_root_certs, cert_chain, private_key)
    for option, key in ((DatabaseOptions.TLS_ROOT_CERTS, "tls_root_certs"),
                        (DatabaseOptions.MTLS_CERT_CHAIN, "cert_chain"),
                        (DatabaseOptions.MTLS_PRIVATE_KEY, "private_key")):
        if key in tls:
            db_kwargs[option.value] = tls[key].decode()
    return dbapi.connect(location, db_kwargs=db_kwargs, autocommit=True)
