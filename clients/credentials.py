"""Client credentials: bearer tokens found without pasting, password login, TLS options.

Where `connect` looks for a token, first match wins:
  1. the `token=` argument,
  2. the LCLSTREAM_TOKEN environment variable,
  3. the keyring entry that `lclstream login SERVER` stored under the server's location.

The keyring is the system's (macOS Keychain, Windows Credential Locker, Secret Service). Where
there is none (a headless node), `keyrings.alt` keeps it in an owner-only file instead.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pyarrow.flight as flight

KEYRING_SERVICE = "lclstream"
TOKEN_ENV = "LCLSTREAM_TOKEN"


class TokenExpired(flight.FlightUnauthenticatedError):
    """The token found for a server has expired; the message says how to get a new one."""


def location_key(location: str) -> str:
    """The keyring user name for a server: its location, normalised."""
    scheme, sep, rest = location.strip().rstrip("/").partition("://")
    return f"{scheme.lower()}{sep}{rest.lower()}"


def _keyring():
    import keyring

    return keyring.get_keyring()


def keyring_description() -> str:
    """Where tokens go on this machine, for messages."""
    backend = _keyring()
    where = getattr(backend, "file_path", None)
    return f"{type(backend).__name__}" + (f" ({where})" if where else "")


def stored_token(location: str) -> str | None:
    try:
        return _keyring().get_password(KEYRING_SERVICE, location_key(location))
    except Exception:  # a locked or broken keyring must not stop token-less use
        return None


def store_token(location: str, token: str) -> None:
    _keyring().set_password(KEYRING_SERVICE, location_key(location), token)


def forget_token(location: str) -> bool:
    import keyring.errors

    try:
        _keyring().delete_password(KEYRING_SERVICE, location_key(location))
    except keyring.errors.PasswordDeleteError:
        return False
    return True


def find_token(location: str, token: str | None = None) -> str | None:
    return token or os.environ.get(TOKEN_ENV) or stored_token(location)


def expiry(token: str) -> float | None:
    """The token's `exp` as Unix time, read without verifying (only the server can verify)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


def check_not_expired(location: str, token: str) -> None:
    exp = expiry(token)
    if exp is not None and exp < time.time():
        when = dt.datetime.fromtimestamp(exp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise TokenExpired(f"your token for {location} expired at {when}; log in again with "
                           f"`lclstream login {location}`")


def _pem(value: str | os.PathLike | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def tls_options(tls_root_certs: Any = None, cert_chain: Any = None,
                private_key: Any = None) -> dict[str, bytes]:
    """pyarrow.flight.connect options from PEM bytes or file paths: the CA bundle that signed
    the server's certificate, and the client certificate and key for mutual TLS."""
    if (cert_chain is None) != (private_key is None):
        raise ValueError("a client certificate needs both cert_chain and private_key")
    options = {"tls_root_certs": _pem(tls_root_certs), "cert_chain": _pem(cert_chain),
               "private_key": _pem(private_key)}
    return {k: v for k, v in options.items() if v is not None}


class BearerToken(flight.ClientMiddlewareFactory):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self.headers = {"authorization": f"Bearer {token}"}

    def start_call(self, info: flight.CallInfo) -> flight.ClientMiddleware:
        return _SendHeaders(self.headers)


class _SendHeaders(flight.ClientMiddleware):
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def sending_headers(self) -> dict[str, str]:
        return self.headers


def login(location: str, username: str, password: str, **tls: Any) -> str:
    """Password login (Flight Handshake, Basic credentials); returns the server's bearer token."""
    client = flight.connect(location, **tls_options(**tls))
    try:
        _, value = client.authenticate_basic_token(username, password)
    finally:
        client.close()
    scheme, _, token = value.decode().partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise flight.FlightUnauthenticatedError("the server's login reply carried no token")
    return token
