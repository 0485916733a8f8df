"""TLS and mutual TLS over real sockets, with certificates from `lclstream certs make`."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from clients import connect
from flight_server.security import certs
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import LCLS2_EXP, start_server

DENIED = flight.FlightUnauthorizedError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return certs.make(tmp_path_factory.mktemp("pki"), client_name="alice")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Certificates from another CA, which the server does not trust."""
    return certs.make(tmp_path_factory.mktemp("other-pki"), client_name="alice")


@pytest.fixture(scope="module")
def tls_server(data_root: Path, pki: dict[str, Path]) -> Iterator[LclstreamServer]:
    srv = start_server(data_root, host="localhost", tls_cert=pki["server_cert"],
                       tls_key=pki["server_key"])
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def mtls_server(data_root: Path, pki: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LclstreamServer]:
    """Requires a client certificate from our CA *and* a token naming the certificate's
    holder. Its own state dir: no users file, so password login is off, which lets pyarrow
    report the certificate's identity."""
    srv = start_server(data_root, host="localhost", tls_cert=pki["server_cert"],
                       tls_key=pki["server_key"], tls_client_ca=pki["ca"],
                       bind_token_to_certificate=True,
                       state_dir=tmp_path_factory.mktemp("mtls-state"))
    yield srv
    srv.shutdown()


def tls_location(server: LclstreamServer) -> str:
    return f"grpc+tls://localhost:{server.port}"


def token_for(server: LclstreamServer, subject: str) -> str:
    return server.security.minter.mint(subject, Grants.build(read=["*"]), 600)


def test_certs_make_writes_private_keys_owner_only(pki: dict[str, Path]) -> None:
    for role in ("server_key", "client_key"):
        assert stat.S_IMODE(pki[role].stat().st_mode) == 0o600
    assert all(p.read_bytes().startswith(b"-----BEGIN") for p in pki.values())


def test_tls_read(tls_server: LclstreamServer, pki: dict[str, Path]) -> None:
    with connect(tls_location(tls_server), tls_root_certs=pki["ca"]) as c:
        assert c.read(LCLS2_EXP, 7, ["gmd/energy"]).num_rows == 120


def test_tls_server_refuses_plaintext_and_unknown_ca(tls_server: LclstreamServer,
                                                      stranger: dict[str, Path]) -> None:
    with pytest.raises(flight.FlightUnavailableError):
        connect(f"grpc://localhost:{tls_server.port}").experiments()
    with pytest.raises(flight.FlightUnavailableError):  # server cert not signed by this CA
        connect(tls_location(tls_server), tls_root_certs=stranger["ca"]).experiments()


def test_mtls_with_certificate_and_matching_token(mtls_server: LclstreamServer,
                                                  pki: dict[str, Path]) -> None:
    with connect(tls_location(mtls_server), token_for(mtls_server, "alice"),
                 tls_root_certs=pki["ca"], cert_chain=pki["client_cert"],
                 private_key=pki["client_key"]) as c:
        who = c.whoami()
        assert who["subject"] == "alice" and who["certificate"] == "alice"
        assert c.read(LCLS2_EXP, 7, ["gmd/energy"]).num_rows == 120


def test_mtls_token_of_someone_else_is_denied(mtls_server: LclstreamServer,
                                              pki: dict[str, Path]) -> None:
    with connect(tls_location(mtls_server), token_for(mtls_server, "bob"),
                 tls_root_certs=pki["ca"], cert_chain=pki["client_cert"],
                 private_key=pki["client_key"]) as c:
        with pytest.raises(DENIED, match="token subject 'bob' does not match the client "
                                         "certificate's identity 'alice'"):
            c.read(LCLS2_EXP, 7, ["gmd/energy"])
        with pytest.raises(DENIED):
            c.experiments()


def test_mtls_missing_client_certificate(mtls_server: LclstreamServer,
                                         pki: dict[str, Path]) -> None:
    # The TLS handshake fails before any RPC: gRPC reports it as UNAVAILABLE.
    with pytest.raises(flight.FlightUnavailableError):
        connect(tls_location(mtls_server), token_for(mtls_server, "alice"),
                tls_root_certs=pki["ca"]).experiments()


def test_mtls_client_certificate_from_untrusted_ca(mtls_server: LclstreamServer,
                                                   pki: dict[str, Path],
                                                   stranger: dict[str, Path]) -> None:
    with pytest.raises(flight.FlightUnavailableError):
        connect(tls_location(mtls_server), token_for(mtls_server, "alice"),
                tls_root_certs=pki["ca"], cert_chain=stranger["client_cert"],
                private_key=stranger["client_key"]).experiments()


def test_mtls_certificate_without_token(mtls_server: LclstreamServer,
                                        pki: dict[str, Path], monkeypatch) -> None:
    monkeypatch.delenv("LCLSTREAM_TOKEN")
    with pytest.raises(flight.FlightUnauthenticatedError, match="no credentials"):
        connect(tls_location(mtls_server), tls_root_certs=pki["ca"],
                cert_chain=pki["client_cert"], private_key=pki["client_key"]).experiments()


def test_adbc_over_mtls(mtls_server: LclstreamServer, pki: dict[str, Path]) -> None:
    import adbc_driver_flightsql.dbapi as dbapi
    import adbc_driver_manager
    from adbc_driver_flightsql import DatabaseOptions

    options = {
        DatabaseOptions.TLS_ROOT_CERTS.value: pki["ca"].read_text(),
        DatabaseOptions.MTLS_CERT_CHAIN.value: pki["client_cert"].read_text(),
        DatabaseOptions.MTLS_PRIVATE_KEY.value: pki["client_key"].read_text(),
        DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token_for(mtls_server, 'alice')}",
    }
    query = "SELECT count(*) FROM tmox42619.events"
    with dbapi.connect(tls_location(mtls_server), db_kwargs=options, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute(query)
            assert cur.fetchall() == [(120 + 90,)]
    options[DatabaseOptions.AUTHORIZATION_HEADER.value] = (
        f"Bearer {token_for(mtls_server, 'bob')}")
    with dbapi.connect(tls_location(mtls_server), db_kwargs=options, autocommit=True) as conn:
        with conn.cursor() as cur, pytest.raises(adbc_driver_manager.Error) as info:
            cur.execute(query)
    assert "PERMISSION_DENIED" in str(info.value) or "Unauthorized" in str(info.value)


@pytest.mark.parametrize("settings, phrase", [
    ({"tls_cert": Path("x.pem")}, "--tls-cert needs --tls-key"),
    ({"tls_key": Path("x.key")}, "--tls-key needs --tls-cert"),
    ({"tls_client_ca": Path("ca.pem")}, "needs --tls-cert and --tls-key"),
    ({"bind_token_to_certificate": True}, "needs mutual TLS"),
])
def test_inconsistent_tls_settings_refuse_to_start(data_root: Path, settings: dict,
                                                   phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        start_server(data_root, **settings)
