"""Who is calling: the Flight middleware that authenticates every call, and password login.

Every RPC passes through `AuthMiddlewareFactory.start_call`, which reads `Authorization: Bearer
<jwt>` and verifies it against the trusted issuers (several at once: the server's own, and any
institution's). The RPC methods then ask `authorize` whether the caller's grants cover the
experiment they touch. Handshake with `Authorization: Basic ...` is password login: the reply
carries `authorization: Bearer <jwt>` signed by the server, which is what pyarrow's
`authenticate_basic_token` and ADBC's username/password options expect.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow.flight as flight

from flight_server.metrics import Metrics, method_name
from flight_server.security.audit import AuditLog
from flight_server.security.policy import ANONYMOUS, Identity, Unauthenticated
from flight_server.security.tokens import TokenMinter, TokenVerifier
from flight_server.security.users import LoginThrottle, Users

MAX_AUTHORIZATION_BYTES = 6144  # under gRPC's 8 KiB for all headers; IdP tokens reach ~4 KiB
MIDDLEWARE_KEY = "auth"


def _header(headers: Mapping[str, list], name: str) -> str | None:
    values = headers.get(name) or []
    if len(values) > 1:
        raise Unauthenticated(f"more than one '{name}' header")
    if not values:
        return None
    value = values[0]
    value = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(value) > MAX_AUTHORIZATION_BYTES:
        raise Unauthenticated(f"'{name}' header is {len(value)} bytes; at most "
                              f"{MAX_AUTHORIZATION_BYTES} are accepted")
    return value


def _credentials(authorization: str | None) -> tuple[str, str]:
    """('bearer', token) or ('basic', 'user:password') from an Authorization header."""
    if authorization is None:
        raise Unauthenticated("no credentials: send 'authorization: Bearer <token>' "
                              "(`lclstream login SERVER` stores one for you)")
    scheme, _, value = authorization.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme not in ("bearer", "basic") or not value:
        raise Unauthenticated("malformed authorization header: expected 'Bearer <token>' "
                              "(or 'Basic <base64 user:password>' in Handshake)")
    if scheme == "basic":
        try:  # ADBC's Go core sends base64 without padding
            value = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("malformed Basic credentials: not base64 of "
                                  "'user:password'") from None
    return scheme, value


class CallRecord(flight.ServerMiddleware):
    """One call: who made it, what it touched, what it sent. Written to the audit log and
    counted in the metrics when the call completes; the RPC methods fill in experiment, run,
    peer, bytes and (for DoAction) the action."""

    def __init__(self, audit: AuditLog, rpc: str, identity: Identity,
                 reply_headers: dict[str, str] | None = None, metrics: Metrics | None = None,
                 method: str = "", started: float | None = None) -> None:
        self.audit = audit
        self.rpc = rpc
        self.identity = identity
        self.reply_headers = reply_headers or {}
        self.peer = ""
        self.certificate = ""
        self.experiment: str | None = None
        self.run: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.action: str | None = None  # DoAction: the action's type, if the server knows it
        self.metrics = metrics
        self.method = method  # as Flight names it: "DoGet"
        self.started = time.perf_counter() if started is None else started
        self._stream: str | None = None  # the kind of data stream this call holds open
        self._count_sent: Callable[[float], None] | None = None  # looked up on first use
        self._count_received: Callable[[float], None] | None = None

    def sent(self, nbytes: int) -> None:
        """A batch went out: counted per call (audit) and per method (metrics) as it goes, so
        that a long subscription shows in the metrics before it ends."""
        self.bytes_sent += nbytes
        if self.metrics is not None:
            if self._count_sent is None:
                self._count_sent = self.metrics.sent(self.method)
            self._count_sent(nbytes)

    def received(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self.metrics is not None:
            if self._count_received is None:
                self._count_received = self.metrics.received(self.method)
            self._count_received(nbytes)

    def streaming(self, kind: str) -> None:
        """The call holds a data stream of `kind` ("archive", "live", "sql") open until it
        completes: counted in `lclstream_active_streams`."""
        if self.metrics is not None and self._stream is None:
            self._stream = kind
            self.metrics.stream_opened(self.method, kind)

    def sending_headers(self) -> dict[str, str]:
        return self.reply_headers

    def call_completed(self, exception: BaseException | None) -> None:
        self.audit.call(self, exception)
        if self.metrics is not None:
            if self._stream is not None:
                self.metrics.stream_closed(self.method, self._stream)
            self.metrics.call_completed(self.method, exception,
                                        time.perf_counter() - self.started, self.action)


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call; `None` as verifier means --no-auth (everyone is anonymous)."""

    def __init__(self, audit: AuditLog, verifier: TokenVerifier | None = None,
                 minter: TokenMinter | None = None, users: Users | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        self.audit = audit
        self.verifier = verifier
        self.minter = minter
        self.users = users
        self.throttle = throttle or LoginThrottle()
        self.metrics: Metrics | None = None  # set by the server that uses this factory

    def start_call(self, info: flight.CallInfo, headers: Mapping[str, list]) -> CallRecord:
        started = time.perf_counter()
        rpc = info.method.name.lower()
        method = method_name(info.method)

        def record(identity: Identity, reply: dict[str, str] | None = None) -> CallRecord:
            return CallRecord(self.audit, rpc, identity, reply, self.metrics, method, started)

        try:
            if self.verifier is None:
                return record(ANONYMOUS)
            scheme, value = _credentials(_header(headers, "authorization"))
            if info.method == flight.FlightMethod.HANDSHAKE and scheme == "basic":
                identity, token = self._login(value)
                return record(identity, {"authorization": f"Bearer {token}"})
            if scheme != "bearer":
                raise Unauthenticated("Basic credentials are accepted only in Handshake; send "
                                      "'authorization: Bearer <token>'")
            return record(self.verifier.verify(value))
        except flight.FlightError as exc:
            self.audit.refused(rpc, exc)
            if self.metrics is not None:  # pyarrow calls no call_completed for these
                self.metrics.call_completed(method, exc, time.perf_counter() - started)
            raise

    def _login(self, credentials: str) -> tuple[Identity, str]:
        if self.users is None or self.minter is None or not self.users.exists():
            raise Unauthenticated("password login is not enabled on this server; use a token")
        name, sep, password = credentials.partition(":")
        if not sep or not name:
            raise Unauthenticated("malformed Basic credentials: expected 'user:password'")
        wait = self.throttle.retry_after(name)
        if wait > 0:
            raise Unauthenticated(f"too many failed logins for '{name}'; try again in "
                                  f"{wait:.0f} s")
        user = self.users.verify(name, password)
        if user is None:
            self.throttle.failed(name)
            raise Unauthenticated("wrong user name or password")
        self.throttle.succeeded(name)
        token = self.minter.mint(name, user.grants)
        identity = Identity(name, self.minter.issuer, user.grants,
                            time.time() + self.minter.ttl)
        return identity, token


class HandshakeAuthHandler(flight.ServerAuthHandler):
    """Lets Handshake succeed so that its reply carries the bearer token the middleware set.

    pyarrow answers Handshake with UNIMPLEMENTED unless an auth handler is installed. The
    middleware has already checked the password when this runs; calls are authenticated by the
    middleware, never by this handler's empty identity. Cost: with a handler installed, pyarrow
    reports the handler's identity instead of the client certificate's, so password login and
    certificate-bound tokens cannot be used together (checked at start-up).
    """

    def authenticate(self, outgoing: Any, incoming: Any) -> None:
        pass

    def is_valid(self, token: bytes) -> bytes:
        return b""


