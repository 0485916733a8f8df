"""Assemble the server's security from its settings: TLS, the auth middleware, ticket seals.

Start-up refuses configurations that would be unsafe or would not do what they say: --no-auth on
a non-loopback address, a TLS certificate without its key, certificate-bound tokens together with
password login (pyarrow cannot report the client certificate once a Handshake handler exists).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow.flight as flight

from flight_server.config import Settings
from flight_server.security import keys
from flight_server.security.audit import AuditLog
from flight_server.security.middleware import AuthMiddlewareFactory, HandshakeAuthHandler
from flight_server.security.policy import is_loopback
from flight_server.security.tickets import TicketSeal
from flight_server.security.tokens import Issuer, TokenMinter, TokenVerifier
from flight_server.security.users import UsersFile

log = logging.getLogger(__name__)


@dataclass
class Security:
    server_options: dict[str, Any]  # FlightServerBase keyword arguments
    middleware: AuthMiddlewareFactory
    seal: TicketSeal
    minter: TokenMinter | None
    audit: AuditLog

    def close(self) -> None:
        self.audit.close()


def minter_for(settings: Settings) -> TokenMinter:
    key = keys.signing_key(settings.state_path(), settings.token_algorithm)
    return TokenMinter(settings.token_issuer, settings.token_audience, settings.token_algorithm,
                       key, settings.token_ttl)


def _tls_options(settings: Settings) -> dict[str, Any]:
    if settings.tls_key is not None and settings.tls_cert is None:
        raise ValueError("--tls-key needs --tls-cert")
    if settings.tls_cert is None:
        if settings.tls_client_ca is not None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return {}
    if settings.tls_key is None:
        raise ValueError("--tls-cert needs --tls-key")
    pair = flight.CertKeyPair(settings.tls_cert.read_bytes(), settings.tls_key.read_bytes())
    options: dict[str, Any] = {"tls_certificates": [pair]}
    if settings.tls_client_ca is not None:
        options["verify_client"] = True
        options["root_certificates"] = settings.tls_client_ca.read_bytes()
    return options


def build(settings: Settings) -> Security:
    if not settings.auth and not is_loopback(settings.host):
        raise ValueError(f"--no-auth serves anyone who can connect, so it binds only to loopback "
                         f"(127.0.0.1, ::1, localhost), not {settings.host!r}")
    if settings.bind_token_to_certificate and settings.tls_client_ca is None:
        raise ValueError("bind_token_to_certificate needs mutual TLS (--tls-client-ca)")
    options = _tls_options(settings)
    audit = AuditLog(settings.audit_log, settings.log_max_bytes, settings.log_backups)
    seal = TicketSeal(keys.ticket_key(settings.state_path()))
    if not settings.auth:
        log.warning("authentication is OFF (--no-auth): every local user can read every run")
        return Security(options, AuthMiddlewareFactory(audit), seal, None, audit)

    minter = minter_for(settings)
    issuers = [minter.verifying_issuer()]
    issuers += [Issuer.from_config(t, settings.token_audience) for t in settings.issuers]
    verifier = TokenVerifier(issuers, leeway=settings.leeway)
    users: UsersFile | None = UsersFile(settings.users_path())
    if settings.bind_token_to_certificate:
        if users.exists():
            raise ValueError(
                f"password login ({users.path}) cannot be combined with "
                "bind_token_to_certificate: once a Handshake handler is installed, pyarrow no "
                "longer reports the client certificate. Remove the users file or the binding.")
        users = None
    else:
        options["auth_handler"] = HandshakeAuthHandler()
    factory = AuthMiddlewareFactory(audit, verifier, minter, users)
    log.info("authentication on: issuers %s; password login from %s",
             ", ".join(i.name for i in issuers), users.path if users else "(off)")
    return Security(options, factory, seal, minter, audit)
