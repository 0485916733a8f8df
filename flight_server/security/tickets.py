"""Sealed tickets: the server signs each ticket it plans, and DoGet refuses any other.

A ticket is the v1 JSON document, a '.', and an HMAC-SHA256 of the document (base64url). The
seal stops a client from editing a ticket into a request it never planned; it does not make the
ticket a capability: DoGet still checks that the caller may read the experiment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from flight_server.errors import InvalidArgument
from flight_server.security.policy import Forbidden
from schemas import RequestError, Ticket, parse_ticket


class TicketSeal:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the ticket key must be at least 16 bytes")
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        digest = hmac.new(self._key, body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def seal(self, ticket: Ticket) -> bytes:
        return self.sign(ticket.encode())

    def sign(self, body: bytes) -> bytes:
        return body + b"." + self._mac(body)

    def verify(self, raw: bytes) -> bytes:
        """The signed body, if this server signed it unaltered."""
        body, sep, mac = raw.rpartition(b".")
        if not sep or not hmac.compare_digest(mac, self._mac(body)):
            raise Forbidden("ticket was altered or was not issued by this server; plan again "
                            "with GetFlightInfo")
        return body

    def open(self, raw: bytes) -> Ticket:
        """The ticket, if this server sealed it unaltered and it is a valid v1 ticket."""
        try:
            return parse_ticket(self.verify(raw))
        except RequestError as exc:
            raise InvalidArgument(f"{exc}; tickets come from GetFlightInfo") from None
