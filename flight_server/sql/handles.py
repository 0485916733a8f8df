"""Statement handles: stateless, sealed, and bound to the user who created them.

A handle carries everything needed to run its statement (the SQL, its parameters as Arrow IPC)
and the identity of its creator, sealed with the server's ticket key. The server keeps no
per-statement state, so handles survive restarts, cost nothing when a client forgets to close
them, and cannot be forged or edited. Parameter binding returns a new handle (Flight SQL's
DoPutPreparedStatementResult) rather than storing the parameters.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.errors import InvalidArgument, NotFound
from flight_server.security.client_data import check_types, is_scalar_parameter, read_validated
from flight_server.security.policy import Forbidden, Identity
from flight_server.security.tickets import TicketSeal

MAX_PARAMETER_BYTES = 64 * 1024  # bound parameters travel inside the handle


@dataclass(frozen=True)
class Statement:
    query: str
    subject: str
    issuer: str
    parameters: pa.Table | None = None

    def rows(self) -> list[list[object]]:
        """One list of values per parameter row (a query runs once per row)."""
        if self.parameters is None or self.parameters.num_columns == 0:
            return [[]]
        return [list(row.values()) for row in self.parameters.to_pylist()]


def seal(statement: Statement, key: TicketSeal) -> bytes:
    body = {"q": statement.query, "sub": statement.subject, "iss": statement.issuer}
    if statement.parameters is not None:
        body["p"] = base64.b64encode(_ipc(statement.parameters)).decode()
    return key.sign(json.dumps(body, separators=(",", ":")).encode())


def open_statement(raw: bytes, key: TicketSeal, caller: Identity) -> Statement:
    """The statement, if this server sealed it for this caller; otherwise it does not exist for
    them (the same answer whether it was forged or belongs to someone else)."""
    try:
        body = json.loads(key.verify(raw))
        statement = Statement(body["q"], body["sub"], body["iss"],
                              _from_ipc(base64.b64decode(body["p"])) if "p" in body else None)
    except (Forbidden, ValueError, KeyError, TypeError, pa.ArrowException):
        raise NotFound("no such statement handle: it was not issued by this server; prepare "
                       "the statement again") from None
    if (statement.subject, statement.issuer) != (caller.subject, caller.issuer):
        raise NotFound("no such statement handle for you: prepared statements belong to the "
                       "user who prepared them; prepare it again")
    return statement


def read_parameters(reader: flight.MetadataRecordBatchReader) -> pa.Table:
    """The parameters a client binds, validated in full (see client_data) before any use."""
    check_types(reader.schema, is_scalar_parameter, "bound parameters",
                "parameters are scalars: numbers, strings, binary, booleans, dates and times")
    return read_validated(reader, "bound parameters", MAX_PARAMETER_BYTES)


def with_parameters(statement: Statement, parameters: pa.Table, expected: int) -> Statement:
    if parameters.num_columns != expected:
        raise InvalidArgument(f"the statement takes {expected} parameter(s), "
                              f"{parameters.num_columns} were bound")
    if len(_ipc(parameters)) > MAX_PARAMETER_BYTES:
        raise InvalidArgument(f"bound parameters exceed {MAX_PARAMETER_BYTES // 1024} KiB; "
                              "put large value lists in the query or split it")
    return Statement(statement.query, statement.subject, statement.issuer, parameters)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
