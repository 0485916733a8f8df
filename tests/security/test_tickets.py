"""Sealed tickets (flight_server.security.tickets) on their own: what one server seals it opens
unchanged; an edited body, an edited or foreign MAC, or no seal at all is Forbidden; a sealed
document that is not a valid ticket is an InvalidArgument."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pyarrow.flight as flight
import pytest

from flight_server.errors import InvalidArgument
from flight_server.security.policy import Forbidden
from flight_server.security.tickets import TicketSeal
from schemas import Ticket

KEY = bytes(range(32))
TICKET = Ticket("tmox42619", 7, ("gmd/energy", "pnccd/image"), 0, 120, 1)
SHAPED = Ticket("tmox42619", 8, ("time", "gmd/energy"), 15, 90, 3, filter="gmd/energy > 0.5",
                processing=({"step": "roi", "column": "pnccd/image", "y": [0, 8]},))


@pytest.fixture
def seal() -> TicketSeal:
    return TicketSeal(KEY)


def refused(call) -> str:
    with pytest.raises(Forbidden) as info:
        call()
    assert isinstance(info.value, flight.FlightUnauthorizedError)  # PERMISSION_DENIED
    message = str(info.value)
    assert "ticket was altered or was not issued by this server" in message
    assert "plan again with GetFlightInfo" in message
    return message


# -- sign and verify ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{}", b"", b"a.b.c", TICKET.encode(), SHAPED.encode(),
                                  "\u00e9\u2603".encode(), bytes(range(256))])
def test_sign_then_verify_gives_the_body_back(seal: TicketSeal, body: bytes) -> None:
    signed = seal.sign(body)
    assert signed.startswith(body + b".")
    assert seal.verify(signed) == body
    assert TicketSeal(KEY).verify(signed) == body  # another seal with the same key: a restart


def test_the_mac_is_unpadded_base64url_hmac_sha256(seal: TicketSeal) -> None:
    body = TICKET.encode()
    mac = seal.sign(body)[len(body) + 1:]
    expected = base64.urlsafe_b64encode(hmac.new(KEY, body, hashlib.sha256).digest()).rstrip(b"=")
    assert mac == expected and len(mac) == 43 and b"=" not in mac and b"." not in mac
    assert seal.sign(body) == seal.sign(body)  # deterministic: the same plan, the same ticket


def test_seal_then_open_gives_the_ticket_back(seal: TicketSeal) -> None:
    for ticket in (TICKET, SHAPED):
        sealed = seal.seal(ticket)
        assert sealed == seal.sign(ticket.encode())
        assert seal.open(sealed) == ticket


def test_an_altered_body_is_forbidden(seal: TicketSeal) -> None:
    sealed = seal.seal(TICKET)
    body, _, mac = sealed.rpartition(b".")
    widened = json.loads(body) | {"stop": 10**6}
    forged = json.dumps(widened, separators=(",", ":")).encode() + b"." + mac
    refused(lambda: seal.verify(forged))
    refused(lambda: seal.open(forged))  # refused before it is parsed
    other_run = body.replace(b'"run":7', b'"run":8') + b"." + mac
    refused(lambda: seal.open(other_run))
    for i in (0, len(body) // 2, len(body) - 1):  # one byte anywhere in the body
        flipped = bytearray(sealed)
        flipped[i] ^= 0x01
        refused(lambda f=bytes(flipped): seal.verify(f))
    refused(lambda: seal.verify(body + b" ." + mac))
    refused(lambda: seal.verify(b" " + sealed))


def test_an_altered_mac_is_forbidden(seal: TicketSeal) -> None:
    sealed = seal.seal(TICKET)
    body, _, mac = sealed.rpartition(b".")
    for bad in (mac[:-1], mac + b"A", mac + b"=", mac.upper(), mac[::-1], b"", b"." + mac,
                base64.urlsafe_b64encode(base64.urlsafe_b64decode(mac + b"=")[:-1] + b"\0")):
        refused(lambda b=bad: seal.verify(body + b"." + b))
    for i in range(len(mac)):
        flipped = bytearray(mac)
        flipped[i] = ord("A") if flipped[i] != ord("A") else ord("B")
        refused(lambda f=bytes(flipped): seal.verify(body + b"." + f))


def test_a_ticket_without_a_seal_or_from_another_key_is_forbidden(seal: TicketSeal) -> None:
    body = TICKET.encode()
    refused(lambda: seal.verify(body))  # no '.' at all
    refused(lambda: seal.open(body))
    refused(lambda: seal.verify(b""))
    refused(lambda: seal.verify(b"."))
    other = TicketSeal(b"another key of 32 bytes, or so..")
    refused(lambda: seal.open(other.seal(TICKET)))
    refused(lambda: other.open(seal.seal(TICKET)))
    near = TicketSeal(KEY[:-1] + bytes([KEY[-1] ^ 1]))  # one bit of the key differs
    refused(lambda: near.verify(seal.sign(body)))


# -- the key -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"", b"k", b"x" * 15])
def test_a_short_key_is_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match="the ticket key must be at least 16 bytes"):
        TicketSeal(key)


def test_a_sixteen_byte_key_will_do() -> None:
    seal = TicketSeal(b"x" * 16)
    assert seal.open(seal.seal(TICKET)) == TICKET


# -- open: the seal holds but the document is not a ticket ---------------------------------------


@pytest.mark.parametrize(("body", "phrase"), [
    (b"not json", "ticket is not valid JSON"),
    (b"[1, 2]", "ticket must be a JSON object"),
    (b"{}", "invalid ticket"),
    (json.dumps({**json.loads(TICKET.encode()), "v": 2}).encode(), "invalid ticket at v"),
    (json.dumps({**json.loads(TICKET.encode()), "step": 0}).encode(), "invalid ticket at step"),
    (json.dumps({**json.loads(TICKET.encode()), "run": "7"}).encode(), "invalid ticket at run"),
    (json.dumps({**json.loads(TICKET.encode()), "start": 9, "stop": 3}).encode(),
     "ticket event range is reversed: 9 > 3"),
    (json.dumps({**json.loads(TICKET.encode()), "sql": "DROP"}).encode(), "invalid ticket"),
])
def test_a_sealed_invalid_ticket_is_an_invalid_argument(seal: TicketSeal, body: bytes,
                                                        phrase: str) -> None:
    signed = seal.sign(body)
    assert seal.verify(signed) == body  # the seal itself holds
    with pytest.raises(InvalidArgument) as info:
        seal.open(signed)
    message = str(info.value)
    assert phrase in message, message
    assert message.endswith("; tickets come from GetFlightInfo")
    assert info.value.__cause__ is None
