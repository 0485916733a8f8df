"""Who is calling, and may they: JWT verification and issuing, the Flight middleware, the policy.

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
import datetime as dt
import ipaddress
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pyarrow.flight as flight
from cryptography.hazmat.primitives import serialization

from flight_server.audit import AuditLog
from flight_server.grants import ALL, GrantError, Grants
from flight_server.users import LoginThrottle, UsersFile

REQUIRED_CLAIMS = ("sub", "exp", "iat", "iss", "aud")
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})
MAX_AUTHORIZATION_BYTES = 6144  # under gRPC's 8 KiB for all headers; IdP tokens reach ~4 KiB
MIDDLEWARE_KEY = "auth"


class Unauthenticated(flight.FlightUnauthenticatedError):
    """No credentials, or credentials that do not verify (UNAUTHENTICATED)."""


class Forbidden(flight.FlightUnauthorizedError):
    """A verified caller whose grants do not cover what they asked for (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Identity:
    subject: str
    issuer: str
    grants: Grants
    expires: float | None = None  # Unix time; None for the anonymous caller of --no-auth

    def may(self, experiment: str, right: str) -> bool:
        return self.grants.allows(experiment, right)


ANONYMOUS = Identity("anonymous", "none (--no-auth)", ALL)


def authorize(identity: Identity, experiment: str, right: str = "read") -> None:
    """Refuse unless the caller's grants cover `right` on `experiment`."""
    if not identity.may(experiment, right):
        raise Forbidden(f"'{identity.subject}' may not {right} experiment '{experiment}' "
                        f"(grants: {identity.grants.describe()})")


# -- issuers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """One trusted token issuer: its `iss`, accepted algorithms, keys, audience, grants claim."""

    name: str
    algorithms: tuple[str, ...]
    audience: str
    grants_claim: str = "grants"
    secret: bytes | None = None
    public_key: Any = None
    jwks: jwt.PyJWKSet | None = None

    def __post_init__(self) -> None:
        algs = set(self.algorithms)
        if not algs:
            raise ValueError(f"issuer '{self.name}': 'algorithms' must list at least one")
        unknown = algs - HMAC_ALGORITHMS - PUBLIC_KEY_ALGORITHMS
        if unknown:
            raise ValueError(f"issuer '{self.name}': unsupported algorithms {sorted(unknown)} "
                             "('none' is never accepted)")
        sources = [s for s in (self.secret, self.public_key, self.jwks) if s is not None]
        if len(sources) != 1:
            raise ValueError(f"issuer '{self.name}' needs exactly one of secret, secret_file, "
                             "public_key_file, jwks_file")
        # Algorithm confusion: a public key must never be used as an HMAC secret, and a secret
        # never for a public-key algorithm.
        if self.secret is not None and algs - HMAC_ALGORITHMS:
            raise ValueError(f"issuer '{self.name}' has a shared secret, so only HS256/HS384/"
                             f"HS512 may be allowed, not {sorted(algs - HMAC_ALGORITHMS)}")
        if self.secret is None and algs & HMAC_ALGORITHMS:
            raise ValueError(f"issuer '{self.name}' has public keys, so HS* algorithms may "
                             "not be allowed")

    def key_for(self, header: Mapping[str, Any]) -> Any:
        if self.secret is not None:
            return self.secret
        if self.public_key is not None:
            return self.public_key
        kid = header.get("kid")
        keys = self.jwks.keys
        if kid is None and len(keys) == 1:
            return keys[0].key
        for key in keys:
            if key.key_id == kid:
                return key.key
        raise Unauthenticated(f"token key id {kid!r} is not in issuer '{self.name}''s key set")

    @classmethod
    def from_config(cls, table: Mapping[str, Any], default_audience: str,
                    base: Path = Path(".")) -> Issuer:
        """An `[[issuer]]` table from the settings file."""
        known = {"name", "algorithms", "audience", "grants_claim", "secret", "secret_file",
                 "public_key_file", "jwks_file"}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"unknown issuer settings {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in table or "algorithms" not in table:
            raise ValueError("each [[issuer]] needs 'name' (its iss claim) and 'algorithms'")
        kwargs: dict[str, Any] = {}
        if "secret" in table:
            kwargs["secret"] = str(table["secret"]).encode()
        if "secret_file" in table:
            kwargs["secret"] = (base / table["secret_file"]).read_bytes().strip()
        if "public_key_file" in table:
            pem = (base / table["public_key_file"]).read_bytes()
            kwargs["public_key"] = serialization.load_pem_public_key(pem)
        if "jwks_file" in table:
            kwargs["jwks"] = jwt.PyJWKSet.from_json((base / table["jwks_file"]).read_text())
        return cls(name=str(table["name"]), algorithms=tuple(table["algorithms"]),
                   audience=str(table.get("audience", default_audience)),
                   grants_claim=str(table.get("grants_claim", "grants")), **kwargs)


# -- verifying -----------------------------------------------------------------------------------


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class TokenVerifier:
    """Verify bearer tokens against several issuers; verified tokens are cached until expiry,
    so a stream of calls with one token pays for one signature check."""

    def __init__(self, issuers: list[Issuer], leeway: float = 30.0,
                 cache_size: int = 10_000) -> None:
        self.issuers = {i.name: i for i in issuers}
        if len(self.issuers) != len(issuers):
            raise ValueError("two trusted issuers have the same name")
        self.leeway = leeway
        self.cache_size = cache_size
        self._cache: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def verify(self, token: str) -> Identity:
        now = time.time()
        with self._lock:
            cached = self._cache.get(token)
        if cached is not None and cached.expires is not None and now < cached.expires + self.leeway:
            return cached
        identity = self._verify(token)
        with self._lock:
            if len(self._cache) >= self.cache_size:
                self._cache = {t: i for t, i in self._cache.items()
                               if i.expires is not None and now < i.expires + self.leeway}
                if len(self._cache) >= self.cache_size:
                    self._cache.clear()
            self._cache[token] = identity
        return identity

    def _verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("bearer token is not a valid JWT") from None
        name = unverified.get("iss")
        issuer = self.issuers.get(name) if isinstance(name, str) else None
        if issuer is None:
            raise Unauthenticated(f"token issuer {name!r} is not trusted by this server; "
                                  f"trusted: {', '.join(sorted(self.issuers))}")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise Unauthenticated(f"token algorithm {alg!r} is not accepted for issuer "
                                  f"'{issuer.name}' (accepted: {', '.join(issuer.algorithms)})")
        try:
            claims = jwt.decode(
                token, issuer.key_for(header), algorithms=list(issuer.algorithms),
                audience=issuer.audience, issuer=issuer.name, leeway=self.leeway,
                options={"require": list(REQUIRED_CLAIMS), "verify_sub": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                f"token expired at {_when(unverified.get('exp', 0))}; log in again "
                "(`lclstream login SERVER`) or ask your issuer for a new token") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token is not valid yet (its nbf or iat is in the future; "
                                  "check the issuing machine's clock)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"token audience {unverified.get('aud')!r} is not this "
                                  f"server's ({issuer.audience!r})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the required claim '{exc.claim}' (required: "
                                  f"{', '.join(REQUIRED_CLAIMS)})") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(f"token signature does not verify with issuer "
                                  f"'{issuer.name}''s key") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("token 'sub' must be a non-empty string")
        try:
            grants = Grants.from_claim(claims.get(issuer.grants_claim))
        except GrantError as exc:
            raise Unauthenticated(f"token's '{issuer.grants_claim}' claim: {exc}") from None
        return Identity(subject, issuer.name, grants, float(claims["exp"]))


# -- issuing -----------------------------------------------------------------------------------


class TokenMinter:
    """Signs the server's own short-lived tokens (HS256 secret or Ed25519 key)."""

    def __init__(self, issuer: str, audience: str, algorithm: str, key: bytes,
                 ttl: float) -> None:
        self.issuer, self.audience, self.algorithm, self.ttl = issuer, audience, algorithm, ttl
        if algorithm == "EdDSA":
            self._signing_key: Any = serialization.load_pem_private_key(key, password=None)
        else:
            self._signing_key = key

    def verifying_issuer(self) -> Issuer:
        """The Issuer that verifies what this minter signs."""
        if self.algorithm == "EdDSA":
            return Issuer(self.issuer, ("EdDSA",), self.audience,
                          public_key=self._signing_key.public_key())
        return Issuer(self.issuer, (self.algorithm,), self.audience, secret=self._signing_key)

    def mint(self, subject: str, grants: Grants, ttl: float | None = None) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer, "aud": self.audience, "sub": subject, "iat": now, "nbf": now,
            "exp": now + int(ttl if ttl is not None else self.ttl),
            "jti": secrets.token_hex(8), "grants": grants.to_claim(),
        }
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)


# -- the middleware ----------------------------------------------------------------------------


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
    """One call: who made it, what it touched, what it sent. Written to the audit log when the
    call completes; the RPC methods fill in experiment, run, peer and bytes."""

    def __init__(self, audit: AuditLog, rpc: str, identity: Identity,
                 reply_headers: dict[str, str] | None = None) -> None:
        self.audit = audit
        self.rpc = rpc
        self.identity = identity
        self.reply_headers = reply_headers or {}
        self.peer = ""
        self.certificate = ""
        self.experiment: str | None = None
        self.run: int | None = None
        self.bytes_sent = 0

    def sending_headers(self) -> dict[str, str]:
        return self.reply_headers

    def call_completed(self, exception: BaseException | None) -> None:
        self.audit.call(self, exception)


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call; `None` as verifier means --no-auth (everyone is anonymous)."""

    def __init__(self, audit: AuditLog, verifier: TokenVerifier | None = None,
                 minter: TokenMinter | None = None, users: UsersFile | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        self.audit = audit
        self.verifier = verifier
        self.minter = minter
        self.users = users
        self.throttle = throttle or LoginThrottle()

    def start_call(self, info: flight.CallInfo, headers: Mapping[str, list]) -> CallRecord:
        rpc = info.method.name.lower()
        try:
            if self.verifier is None:
                return CallRecord(self.audit, rpc, ANONYMOUS)
            scheme, value = _credentials(_header(headers, "authorization"))
            if info.method == flight.FlightMethod.HANDSHAKE and scheme == "basic":
                identity, token = self._login(value)
                return CallRecord(self.audit, rpc, identity, {"authorization": f"Bearer {token}"})
            if scheme != "bearer":
                raise Unauthenticated("Basic credentials are accepted only in Handshake; send "
                                      "'authorization: Bearer <token>'")
            return CallRecord(self.audit, rpc, self.verifier.verify(value))
        except flight.FlightError as exc:
            self.audit.refused(rpc, exc)
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


# -- policy for the peer -----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_to_certificate(identity: Identity, certificate: str) -> None:
    """A deployment that requires both: the token must name the client certificate's holder."""
    if identity is ANONYMOUS:
        return
    if not certificate:
        raise Unauthenticated("this server requires a client certificate that names the "
                              "token's subject; none was presented")
    if certificate != identity.subject:
        raise Forbidden(f"token subject '{identity.subject}' does not match the client "
                        f"certificate's identity '{certificate}'")
