"""Narrowed tokens for delegation: the body of the `narrow_token` action.

A caller asks the server for a token that holds a subset of its own grants, for at most its own
remaining lifetime, to hand to a job or a colleague (one experiment, one hour). The body names the
grants in any shape a token's grants claim takes (see flight_server/security/grants.py), limited
to the rights `read`, `write` and `admin` (a scope this server does not know is a mistake here,
not another service's business):

    {"grants": {"read": ["tmox42619"]}, "ttl": 3600}
    {"grants": "read:tmox42619 write:tmox42619"}
    {"grants": ["read:tmox42619"]}

Whether the caller's grants cover the request is the server's decision; here only the form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from schemas.json_input import RequestError, excerpt
from schemas.request import load_document

SCHEMA = "delegation.schema.json"
MAX_TTL = 366 * 86400  # the schema's maximum; the caller's own expiry caps it anyway
SCOPE = re.compile(r"^(read|write|admin):[A-Za-z0-9_.\-*?\[\]!]{1,128}$")  # as #/$defs/scope


@dataclass(frozen=True)
class NarrowRequest:
    grants: Any  # the grants claim as sent: an object, or a list of scopes
    ttl: int | None = None  # seconds; None: the server's token_ttl


def parse_narrow(raw: bytes | str) -> NarrowRequest:
    """The validated `narrow_token` body; RequestError says what is wrong."""
    doc = load_document(raw, "the body of narrow_token", SCHEMA, "narrow_token")
    grants = doc["grants"]
    if isinstance(grants, str):  # the schema checks a list's scopes; a string's, here
        grants = grants.split()
        for scope in grants:
            if not SCOPE.match(scope):
                raise RequestError(
                    f"invalid the body of narrow_token at grants: scope {excerpt(scope)} is not "
                    "read:GLOB, write:GLOB or admin:GLOB (GLOB: letters, digits, '_', '-', '.', "
                    "'*', '?', '[...]')")
    return NarrowRequest(grants, doc.get("ttl"))
