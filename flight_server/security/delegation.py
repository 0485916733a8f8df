"""Narrowed tokens for delegation: a caller trades its token for one that holds a subset of its
grants and expires no later than it does, to hand to a job or a colleague (one experiment for one
hour) without handing over everything it may do.

Coverage is decided exactly and conservatively, because a glob's set of matches cannot in general
be compared with another's:

- a requested name (no `*`, `?`, `[`) is covered when the caller's grants allow that name for
  that right (`admin` implying `read` and `write`, as everywhere);
- a requested glob is covered only when the caller holds that very glob for that right (or for
  `admin`), or holds `*` for it. `tmox4*` does not cover `tmox42*` here, though it could: ask
  for the names instead, or for the glob you hold.

Only the server's own tokens are narrowed. The new token is signed by this server (`iss` is its
issuer), and jobs and prepared statements belong to (subject, issuer): a narrowed token of an
institution's `alice` would otherwise be this server's `alice`. A job's token is the job's, not a
user's, and cannot be narrowed either.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jwt
import pyarrow as pa
import pyarrow.flight as flight

from flight_server.errors import InvalidArgument, Unsupported
from flight_server.security.audit import outcome
from flight_server.security.grants import RIGHTS, GrantError, Grants
from flight_server.security.middleware import CallRecord
from flight_server.security.policy import Forbidden, Identity, Unauthenticated
from flight_server.security.tokens import TokenMinter
from schemas.delegation import NarrowRequest, parse_narrow
from schemas.json_input import RequestError

ACTION = "narrow_token"
DESCRIPTION = ("JSON {grants, ttl} -> {token, subject, grants, expires}: a token with a subset "
               "of your grants that expires no later than yours, to delegate")
GLOB_CHARACTERS = frozenset("*?[")


def is_glob(name: str) -> bool:
    return not GLOB_CHARACTERS.isdisjoint(name)


def covers(held: Grants, glob: str, right: str) -> bool:
    """Whether every experiment `glob` can match is allowed to `held` for `right`."""
    if not is_glob(glob):
        return held.allows(glob, right)
    holding = {*getattr(held, right), *held.admin}  # admin implies read and write
    return glob in holding or "*" in holding


def uncovered(held: Grants, wanted: Grants) -> list[str]:
    """'read xpp*' for each grant of `wanted` that `held` does not cover; [] when all are."""
    return [f"{right} {glob}" for right in RIGHTS for glob in getattr(wanted, right)
            if not covers(held, glob, right)]


def narrow_token(call: CallRecord, minter: TokenMinter | None, body: bytes) -> dict[str, Any]:
    """The `narrow_token` action: the reply, or a typed refusal. Either way one audit line
    `{"rpc": "narrow_token", ...}` records who asked for what, and what was issued."""
    wanted: list[Grants] = []  # filled once the body parses, for the audit line
    try:
        reply, token_id = _narrow(call.identity, minter, body, wanted)
    except (flight.FlightError, pa.ArrowException) as exc:
        _audit(call, wanted, None, exc)
        raise
    _audit(call, wanted, {**reply, "token_id": token_id}, None)
    return reply


def _narrow(caller: Identity, minter: TokenMinter | None, body: bytes,
            wanted_out: list[Grants]) -> tuple[dict[str, Any], str]:
    if minter is None or caller.expires is None:
        raise Unsupported("this server runs without authentication (--no-auth): it has no "
                          "tokens to narrow")
    if caller.job is not None:
        raise Forbidden(f"a job's token (job {caller.job}) cannot be narrowed: it is the job's, "
                        "not a user's")
    if caller.issuer != minter.issuer:
        raise Forbidden(f"only this server's own tokens (issuer '{minter.issuer}') can be "
                        f"narrowed here, not one of '{caller.issuer}': ask your issuer for a "
                        "token with fewer grants, or log in to this server")
    request = _parse(body)
    try:
        wanted = Grants.from_claim(request.grants)
    except GrantError as exc:
        raise InvalidArgument(f"the body of narrow_token: {exc}") from None
    wanted_out.append(wanted)
    if not wanted.to_claim():
        raise InvalidArgument("the body of narrow_token asks for no grants: name at least one "
                              "experiment, e.g. {\"grants\": {\"read\": [\"tmox42619\"]}}")
    missing = uncovered(caller.grants, wanted)
    if missing:
        raise Forbidden(
            f"'{caller.subject}' may not delegate {', '.join(missing)}: a narrowed token holds "
            f"only grants its caller's cover (a glob only as held, or under '*'), and the "
            f"caller holds: {caller.grants.describe()}")
    if math.floor(caller.expires) <= time.time():
        raise Unauthenticated("your token expires now; log in again (`lclstream login SERVER`) "
                              "before narrowing it")
    ttl = request.ttl if request.ttl is not None else minter.ttl
    token = minter.mint(caller.subject, wanted, ttl, not_after=caller.expires)
    claims = jwt.decode(token, options={"verify_signature": False})
    reply = {"token": token, "subject": caller.subject, "grants": wanted.to_claim(),
             "expires": claims["exp"]}
    return reply, claims["jti"]


def _parse(body: bytes) -> NarrowRequest:
    try:
        return parse_narrow(body)
    except RequestError as exc:
        raise InvalidArgument(str(exc)) from None


def _audit(call: CallRecord, wanted: list[Grants], reply: dict[str, Any] | None,
           exception: BaseException | None) -> None:
    identity = call.identity
    fields: dict[str, Any] = {
        "rpc": ACTION, "outcome": outcome(exception), "sub": identity.subject,
        "iss": identity.issuer, "cert": call.certificate, "peer": call.peer,
        "experiment": None, "run": None, "bytes": 0,
        "grants": wanted[0].describe() if wanted else None,
    }
    if reply is not None:
        fields.update(expires=reply["expires"], token_id=reply["token_id"])
    if exception is not None:
        fields["error"] = str(exception).split(". Detail:", 1)[0][:500]
    call.audit.write(**fields)
