"""The error contract (schemas/errors.py), from the client's side: errors that pyarrow delivers
without their status (GetSchema) come back to `clients` users with the right type, whatever
module of the server raised them."""

from __future__ import annotations

import importlib
import pkgutil

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import flight_server
from clients import connect
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from schemas.errors import ERROR_CLASSES, status_named_in

STATUS_OF_BASE = {
    flight.FlightUnauthenticatedError: "UNAUTHENTICATED",
    flight.FlightUnauthorizedError: "PERMISSION_DENIED",
    flight.FlightUnavailableError: "UNAVAILABLE",
    flight.FlightTimedOutError: "DEADLINE_EXCEEDED",
    flight.FlightCancelledError: "CANCELLED",
    flight.FlightInternalError: "INTERNAL",
    pa.ArrowInvalid: "INVALID_ARGUMENT",
    pa.ArrowKeyError: "NOT_FOUND",
}


def server_exception_classes() -> dict[str, type]:
    """Every exception class defined in the server's modules, by name."""
    found: dict[str, type] = {}
    for module in pkgutil.walk_packages(flight_server.__path__, "flight_server."):
        if module.name.endswith("__main__"):
            continue
        for value in vars(importlib.import_module(module.name)).values():
            if isinstance(value, type) and issubclass(value, Exception) \
                    and value.__module__ == module.name:
                found[value.__name__] = value
    return found


def test_every_class_in_the_contract_is_raised_with_its_status() -> None:
    ours = server_exception_classes()
    for name, status in ERROR_CLASSES.items():
        cls = ours.get(name) or getattr(flight, name, None)
        assert cls is not None, f"the contract names {name}, which the server does not define"
        bases = [s for base, s in STATUS_OF_BASE.items() if issubclass(cls, base)]
        assert bases[:1] == [status], (name, bases)


def test_a_module_path_is_never_part_of_the_contract() -> None:
    for where in ("flight_server.security.policy", "flight_server.auth", "some.other.place"):
        message = f"Unknown error: x. Detail: Python exception: {where}.Forbidden: no"
        assert status_named_in(message) == "PERMISSION_DENIED"
    assert status_named_in("Python exception: NoSuchError: x") is None


def test_get_schema_errors_reach_the_client_with_their_type(server: LclstreamServer) -> None:
    location = f"grpc://127.0.0.1:{server.port}"
    other = server.security.minter.mint("visitor", Grants.build(read=["nothing*"]), 600)
    with connect(location, other) as c, pytest.raises(flight.FlightUnauthorizedError):
        c.schema("tmox42619", 7)
    with connect(location, "not.a.token") as c, \
            pytest.raises(flight.FlightUnauthenticatedError):
        c.schema("tmox42619", 7)
    with connect(location) as c:
        with pytest.raises(pa.ArrowKeyError, match="no run 999"):
            c.schema("tmox42619", 999)
        with pytest.raises(pa.ArrowInvalid):
            c.schema("tmox42619", 7, columns=["x" * 2000])
