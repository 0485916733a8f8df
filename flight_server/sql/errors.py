"""DuckDB's errors as Flight errors, with DuckDB's own message (it is a good one)."""

from __future__ import annotations

import duckdb
import pyarrow.flight as flight

from flight_server.errors import InvalidArgument, NotFound


def translate(exc: duckdb.Error) -> Exception:
    message = str(exc)
    if isinstance(exc, duckdb.InterruptException):
        return flight.FlightCancelledError("query cancelled")
    if isinstance(exc, duckdb.CatalogException):
        return NotFound(f"{message}\nTables are <experiment>.events and <experiment>.runs "
                        "for experiments you may read (quote names with '-' or '.').")
    if isinstance(exc, duckdb.PermissionException):
        return flight.FlightUnauthorizedError(
            f"{message} (queries may read experiment tables only)")
    if isinstance(exc, duckdb.OutOfMemoryException):
        # pyarrow's server has no RESOURCE_EXHAUSTED: the message says what happened
        return flight.FlightServerError(f"query exceeded its memory limit: {message}")
    if isinstance(exc, duckdb.InternalException | duckdb.FatalException):
        return flight.FlightInternalError(f"query failed: {message}")
    return InvalidArgument(message)
