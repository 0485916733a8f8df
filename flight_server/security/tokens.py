"""JWT bearer tokens: the trusted issuers, verification (cached until expiry) and the server's
own issuing. Several issuers at once: the server's own, and any institution's."""

from __future__ import annotations

import datetime as dt
import math
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from flight_server.security.grants import GrantError, Grants
from flight_server.security.policy import Identity, Unauthenticated

REQUIRED_CLAIMS = ("sub", "exp", "iat", "iss", "aud")
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})


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
        job = claims.get("job")
        if job is not None and not isinstance(job, str):
            raise Unauthenticated("token 'job' must be a job id (a string)")
        return Identity(subject, issuer.name, grants, float(claims["exp"]), job)


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

    def mint(self, subject: str, grants: Grants, ttl: float | None = None,
             job: str | None = None, not_after: float | None = None) -> str:
        """A token for `subject`; with `job`, one that only produces that job's stream; with
        `not_after`, one that expires no later than then (a narrowed token: its caller's exp)."""
        now = int(time.time())
        exp = now + int(ttl if ttl is not None else self.ttl)
        if not_after is not None:
            exp = min(exp, math.floor(not_after))
        claims = {
            "iss": self.issuer, "aud": self.audience, "sub": subject, "iat": now, "nbf": now,
            "exp": exp,
            "jti": secrets.token_hex(8), "grants": grants.to_claim(),
        }
        if job is not None:
            claims["job"] = job
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)


