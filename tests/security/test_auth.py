"""Authentication and authorisation over real sockets: every bad credential is refused with the
right status, nothing is served, and the refusal is in the audit log.

The server trusts three issuers: its own (HS256, from its state dir), an institution that signs
with an RSA key (public key PEM file), and one that publishes a JWKS file (ES256, with key ids).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from clients import connect
from flight_server.security.grants import Grants
from flight_server.security.users import UsersFile
from flight_server.server import LclstreamServer
from tests.helpers import LCLS1_EXP, LCLS2_EXP, raw_client, start_server, ticket_json

UNAUTHENTICATED, DENIED = flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError
AUDIENCE = "lclstream"
INSTITUTION, JWKS_ISSUER = "https://id.example.edu", "https://sso.example.org"
PASSWORD = "correct horse battery!"


class Keys:
    """The institutions' private keys, kept by the test to sign tokens as they would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_public_pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (directory / "institution.pem").write_bytes(self.rsa_public_pem)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        (directory / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1",
                                                                   "use": "sig"}]}))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("issuers"))


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("auth-state")
    users = UsersFile(state / "users.json")
    users.add("alice", PASSWORD, Grants.build(read=["tmox4*"]))
    users.add("carol", PASSWORD, Grants.build(read=["tmox4*"]))
    users.add("dave", PASSWORD, Grants.build(read=["tmox4*"]))
    return state


@pytest.fixture(scope="module")
def auth_server(data_root: Path, keys: Keys, state_dir: Path) -> Iterator[LclstreamServer]:
    issuers = (
        {"name": INSTITUTION, "algorithms": ["RS256"],
         "public_key_file": str(keys.directory / "institution.pem"), "grants_claim": "scope"},
        {"name": JWKS_ISSUER, "algorithms": ["ES256"],
         "jwks_file": str(keys.directory / "jwks.json")},
    )
    srv = start_server(data_root, state_dir=state_dir, issuers=issuers, leeway=5,
                       audit_log=state_dir / "audit.log")
    yield srv
    srv.shutdown()


@pytest.fixture
def location(auth_server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{auth_server.port}"


def own_token(server: LclstreamServer, subject: str = "alice", read=("tmox4*",),
              ttl: float = 600) -> str:
    return server.security.minter.mint(subject, Grants.build(read=read), ttl)


def claims(**changes) -> dict:
    now = int(time.time())
    base = {"iss": INSTITUTION, "aud": AUDIENCE, "sub": "dana@example.edu", "iat": now,
            "exp": now + 600, "scope": "openid read:tmox4*"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def institution_token(keys: Keys, **changes) -> str:
    return jwt.encode(claims(**changes), keys.rsa, algorithm="RS256")


def audit_lines(state_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "audit.log").read_text().splitlines()]


def call_with(location: str, header: str | bytes | None):
    """A pyarrow client that sends exactly this authorization header (or none)."""
    headers = [] if header is None else [(b"authorization", header if isinstance(header, bytes)
                                          else header.encode())]
    client = flight.connect(location)
    return client, flight.FlightCallOptions(headers=headers)


def refused_everywhere(location: str, header: str | bytes | None, status, *phrases: str) -> None:
    """Every RPC is refused with `status`, the message names the problem, nothing is served."""
    client, options = call_with(location, header)
    descriptor = flight.FlightDescriptor.for_path(LCLS2_EXP, "7")
    calls = {
        "list_flights": lambda: list(client.list_flights(b"", options)),
        "get_flight_info": lambda: client.get_flight_info(descriptor, options),
        "get_schema": lambda: client.get_schema(descriptor, options),
        "do_get": lambda: client.do_get(flight.Ticket(b"{}"), options).read_all(),
        "do_action": lambda: list(client.do_action(flight.Action("experiments", b""), options)),
    }
    detail = {UNAUTHENTICATED: "Unauthenticated", DENIED: "Unauthorized"}[status]
    try:
        for name, call in calls.items():
            # pyarrow's get_schema raises OSError carrying the status only in its text
            # (apache/arrow#43556); the wire status is the same. clients.Client maps it back.
            expected = (status, OSError) if name == "get_schema" else status
            with pytest.raises(expected) as info:
                call()
            assert isinstance(info.value, status) or f"Detail: {detail}" in str(info.value)
            for phrase in phrases:
                assert phrase in str(info.value), f"{name}: {phrase!r} not in {info.value}"
            assert "Traceback" not in str(info.value)
    finally:
        client.close()


# -- bad credentials: UNAUTHENTICATED on every RPC ---------------------------------------------


def test_no_header(location: str) -> None:
    refused_everywhere(location, None, UNAUTHENTICATED, "no credentials", "lclstream login")


@pytest.mark.parametrize("header", ["Token abc", "Bearer", "Bearer   ", "bearer", "Digest x=y",
                                    "Basic"])
def test_malformed_header(location: str, header: str) -> None:
    refused_everywhere(location, header, UNAUTHENTICATED, "malformed")


@pytest.mark.parametrize("token, phrase", [
    ("abc", "not a valid JWT"), ("abc.def.ghi", "not a valid JWT"), ("a" * 2000, "not a valid JWT"),
    ("ey.ey.ey.ey", "not a valid JWT"), ("e30.e30.", "issuer None is not trusted"),
])
def test_garbage_token(location: str, token: str, phrase: str) -> None:
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, phrase)


def test_expired(location: str, keys: Keys) -> None:
    now = int(time.time())
    token = institution_token(keys, iat=now - 7200, exp=now - 3600)
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "token expired at",
                       "log in again")


@pytest.mark.parametrize("change", [{"nbf": "+3600"}, {"iat": "+3600"}])
def test_not_yet_valid(location: str, keys: Keys, change: dict) -> None:
    now = int(time.time())
    token = institution_token(keys, **{k: now + 3600 for k in change})
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "not valid yet")


def test_wrong_signature(location: str) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), impostor, algorithm="RS256")
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "signature does not verify")


def test_own_token_signed_with_another_secret(location: str) -> None:
    token = jwt.encode(claims(iss="lclstream", grants={"read": ["*"]}), "guessed-secret" * 4,
                       algorithm="HS256")
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "signature does not verify")


def test_unknown_issuer(location: str, keys: Keys) -> None:
    token = institution_token(keys, iss="https://evil.example.com")
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "not trusted",
                       INSTITUTION)


@pytest.mark.parametrize("aud", ["someone-else", ["a", "b"]])
def test_wrong_audience(location: str, keys: Keys, aud) -> None:
    token = institution_token(keys, aud=aud)
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "audience")


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "iss", "aud"])
def test_missing_required_claim(location: str, keys: Keys, claim: str) -> None:
    token = institution_token(keys, **{claim: None})
    phrase = "not trusted" if claim == "iss" else claim
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, phrase)


def test_alg_none(location: str) -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "'none'", "not accepted")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_algorithm_confusion_hs256_signed_with_public_key(location: str, keys: Keys) -> None:
    """The classic attack: the issuer's *public* key used as an HMAC secret. pyjwt will not
    even sign such a token, so it is built by hand."""
    signing_input = (_b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + _b64(json.dumps(claims(scope="admin:*")).encode()))
    mac = hmac.new(keys.rsa_public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{_b64(mac)}"
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "'HS256'", "not accepted")


def test_jwks_key_id_must_be_known(location: str, keys: Keys) -> None:
    token = jwt.encode(claims(iss=JWKS_ISSUER, grants={"read": ["*"]}), keys.ec,
                       algorithm="ES256", headers={"kid": "unknown"})
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "key id 'unknown'")


def test_malformed_grants_claim(location: str, keys: Keys) -> None:
    token = jwt.encode(claims(iss=JWKS_ISSUER, grants={"read": ["../*"]}), keys.ec,
                       algorithm="ES256", headers={"kid": "k1"})
    refused_everywhere(location, f"Bearer {token}", UNAUTHENTICATED, "grants", "invalid")


def test_oversized_header(location: str, auth_server: LclstreamServer) -> None:
    token = own_token(auth_server)
    refused_everywhere(location, f"Bearer {token}{'x' * 6500}", UNAUTHENTICATED, "at most 6144")
    # Beyond gRPC's own metadata limit (8 KiB) the transport refuses before any code of ours
    # runs, with RESOURCE_EXHAUSTED.
    client, options = call_with(location, f"Bearer {'x' * 100_000}")
    with pytest.raises(pa.ArrowInvalid, match="metadata size exceeds"):
        client.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, "7"), options)
    client.close()


def test_basic_credentials_only_in_handshake(location: str) -> None:
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    refused_everywhere(location, basic, UNAUTHENTICATED, "only in Handshake")


# -- valid tokens: grants decide ---------------------------------------------------------------


def test_each_trusted_issuer_is_accepted(location: str, keys: Keys,
                                         auth_server: LclstreamServer) -> None:
    tokens = {
        "alice": own_token(auth_server),
        "dana@example.edu": institution_token(keys),
        "erin": jwt.encode(claims(iss=JWKS_ISSUER, sub="erin", grants={"read": ["tmox4*"]}),
                           keys.ec, algorithm="ES256", headers={"kid": "k1"}),
    }
    for subject, token in tokens.items():
        with connect(location, token) as c:
            assert c.whoami()["subject"] == subject
            assert c.experiments() == [LCLS2_EXP]
            assert c.read(LCLS2_EXP, 7, ["gmd/energy"]).num_rows == 120


def test_token_for_another_experiment_is_denied(location: str,
                                                auth_server: LclstreamServer) -> None:
    client = raw_client(location, own_token(auth_server, read=("xpp*",)))
    # ListFlights and the experiments action show only what the caller may read
    listed = {i.descriptor.path[0].decode() for i in client.list_flights()}
    assert listed == {LCLS1_EXP}
    body = json.loads(list(client.do_action(flight.Action("experiments", b"")))[0].body
                      .to_pybytes())
    assert [e["experiment"] for e in body] == [LCLS1_EXP]
    assert list(client.list_flights(LCLS2_EXP.encode())) == []
    descriptor = flight.FlightDescriptor.for_path(LCLS2_EXP, "7")
    with pytest.raises(DENIED, match=f"may not read experiment '{LCLS2_EXP}'"):
        client.get_flight_info(descriptor)
    # pyarrow's server sends a Flight error raised in get_schema as UNKNOWN (it lacks the
    # conversion its other RPCs have); refused all the same, with the same message.
    with pytest.raises(pa.ArrowException, match=f"may not read experiment '{LCLS2_EXP}'"):
        client.get_schema(descriptor)
    client.close()
    with connect(location, own_token(auth_server, read=("xpp*",))) as c:
        with pytest.raises(DENIED, match=f"may not read experiment '{LCLS2_EXP}'"):
            c.schema(LCLS2_EXP, 7)  # the right type, though pyarrow raises OSError here


def test_denied_even_where_the_experiment_does_not_exist(location: str,
                                                         auth_server: LclstreamServer) -> None:
    """No grant: PERMISSION_DENIED whether or not the experiment exists, so a caller cannot
    probe for names. With a grant, the not-found hint names only readable experiments."""
    client = raw_client(location, own_token(auth_server, read=("tmox4*",)))
    for name in (LCLS1_EXP, "xppnothere"):
        with pytest.raises(DENIED):
            client.get_flight_info(flight.FlightDescriptor.for_path(name, "3"))
    with pytest.raises(pa.ArrowKeyError) as info:
        client.get_flight_info(flight.FlightDescriptor.for_path("tmox4nothere", "1"))
    assert LCLS1_EXP not in str(info.value) and "cxilu9218" not in str(info.value)
    client.close()


def test_ticket_replayed_by_a_user_without_the_grant(location: str,
                                                     auth_server: LclstreamServer) -> None:
    owner = raw_client(location, own_token(auth_server, "bob", read=("xpp*",)))
    info = owner.get_flight_info(flight.FlightDescriptor.for_path(LCLS1_EXP, "3"))
    ticket = info.endpoints[0].ticket
    assert owner.do_get(ticket).read_all().num_rows > 0
    thief = raw_client(location, own_token(auth_server, "mallory", read=("tmox4*",)))
    with pytest.raises(DENIED, match="'mallory' may not read experiment 'xppd7114'"):
        thief.do_get(ticket).read_all()
    # a ticket is not bound to its planner: another user *with* the grant may use it
    colleague = raw_client(location, own_token(auth_server, "carl", read=(LCLS1_EXP,)))
    assert colleague.do_get(ticket).read_all().num_rows > 0
    for c in (owner, thief, colleague):
        c.close()


def test_tampered_ticket(location: str, auth_server: LclstreamServer) -> None:
    client = raw_client(location, own_token(auth_server, read=("*",)))
    info = client.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, "7"))
    sealed = info.endpoints[0].ticket.ticket
    body, _, mac = sealed.rpartition(b".")
    edited = json.dumps({**ticket_json(info.endpoints[0].ticket), "stop": 1}).encode()
    flipped = mac[:-1] + (b"A" if mac[-1:] != b"A" else b"B")
    for bad in (edited + b"." + mac, body + b"." + flipped, body, body + b".", b""):
        with pytest.raises(DENIED, match="ticket was altered or was not issued by this server"):
            client.do_get(flight.Ticket(bad)).read_all()
    # a ticket from another server (another seal key) is refused the same way
    assert client.do_get(flight.Ticket(sealed)).read_all().num_rows > 0
    client.close()


# -- password login ------------------------------------------------------------------------------


def test_password_login_returns_a_working_token(location: str) -> None:
    client = flight.connect(location)
    key, value = client.authenticate_basic_token("alice", PASSWORD)
    assert key == b"authorization" and value.startswith(b"Bearer ")
    options = flight.FlightCallOptions(headers=[(key, value)])
    assert [i.descriptor.path[0] for i in client.list_flights(b"", options)] == [
        LCLS2_EXP.encode()] * 2
    client.close()


@pytest.mark.parametrize("user, password", [("alice", "wrong-password"), ("nobody", PASSWORD),
                                            ("alice", ""), ("", PASSWORD)])
def test_wrong_passwords(location: str, user: str, password: str) -> None:
    client = flight.connect(location)
    with pytest.raises(UNAUTHENTICATED, match="wrong user name or password|malformed"):
        client.authenticate_basic_token(user, password)
    client.close()


def test_repeated_failures_are_rate_limited(location: str) -> None:
    client = flight.connect(location)
    for _ in range(5):
        with pytest.raises(UNAUTHENTICATED, match="wrong user name or password"):
            client.authenticate_basic_token("carol", "guess")
    # locked: even the right password is refused until the window has passed
    with pytest.raises(UNAUTHENTICATED, match="too many failed logins for 'carol'"):
        client.authenticate_basic_token("carol", PASSWORD)
    # other users are not affected
    assert client.authenticate_basic_token("alice", PASSWORD)[1].startswith(b"Bearer ")
    client.close()


def test_malformed_basic_credentials(location: str) -> None:
    for header in ("Basic !!!notbase64", "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):
        client, options = call_with(location, header)
        with pytest.raises(UNAUTHENTICATED, match="malformed Basic credentials"):
            list(client.do_action(flight.Action("whoami", b""), options))
        client.close()


# -- the audit log -------------------------------------------------------------------------------


def test_audit_log_has_one_line_per_call(location: str, auth_server: LclstreamServer,
                                         state_dir: Path) -> None:
    before = len(audit_lines(state_dir))
    token = own_token(auth_server, "auditee")
    with connect(location, token) as c:
        table = c.read(LCLS2_EXP, 8, ["gmd/energy", "tof/waveforms"], parallel=1)
    with pytest.raises(UNAUTHENTICATED):
        connect(location, "garbage").experiments()
    lines = audit_lines(state_dir)[before:]
    ok = [line for line in lines if line["sub"] == "auditee"]
    assert [line["rpc"] for line in ok][0] == "get_flight_info"
    gets = [line for line in ok if line["rpc"] == "do_get"]
    assert gets and all(g["outcome"] == "ok" and g["experiment"] == LCLS2_EXP and g["run"] == 8
                        and g["iss"] == "lclstream" and g["peer"].startswith("ipv4:127.0.0.1")
                        for g in gets)
    assert sum(g["bytes"] for g in gets) >= table.nbytes * 0.9
    refused = [line for line in lines if line["outcome"] == "unauthenticated"]
    assert refused and refused[-1]["rpc"] == "do_action"
    assert "not a valid JWT" in refused[-1]["error"]


def test_denials_are_audited(location: str, auth_server: LclstreamServer,
                             state_dir: Path) -> None:
    with connect(location, own_token(auth_server, "snoop", read=("tmox4*",))) as c:
        with pytest.raises(DENIED):
            c.schema(LCLS1_EXP, 3)
    last = [line for line in audit_lines(state_dir) if line["sub"] == "snoop"][-1]
    assert last["outcome"] == "permission_denied" and last["experiment"] == LCLS1_EXP
    assert last["bytes"] == 0


# -- the client ----------------------------------------------------------------------------------


def test_client_says_to_log_in_again_when_its_token_expired(location: str,
                                                           auth_server: LclstreamServer) -> None:
    expired = own_token(auth_server, ttl=-60)
    with pytest.raises(UNAUTHENTICATED, match=f"expired .*lclstream login {location}"):
        connect(location, expired)


# -- ADBC Flight SQL driver: its username/password and authorization-header logins -------------
# This server speaks plain Flight (Flight SQL comes with its own issue), so a query it cannot
# A query that answers, and the audit line naming the caller, show that ADBC's credentials were
# accepted.


def adbc_connect(location: str, **db_kwargs):
    import adbc_driver_flightsql.dbapi as dbapi

    return dbapi.connect(location, db_kwargs=db_kwargs, autocommit=True)


COUNT_EVENTS = "SELECT count(*) FROM tmox42619.events"
EVENTS_IN_TMOX = 120 + 90  # runs 7 and 8 of the test data


def adbc_query(conn) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(COUNT_EVENTS)
        return cur.fetchall()


def adbc_query_error(conn) -> str:
    import adbc_driver_manager

    with conn.cursor() as cur, pytest.raises(adbc_driver_manager.Error) as info:
        cur.execute(COUNT_EVENTS)
    return str(info.value)


def test_adbc_username_password(location: str, state_dir: Path) -> None:
    # ADBC's Go core sends Basic credentials base64 *without* padding; the server accepts both.
    user = "alice"
    assert len(f"{user}:{PASSWORD}") % 3 != 0, "pick credentials whose base64 needs padding"
    with adbc_connect(location, username=user, password=PASSWORD) as conn:
        assert adbc_query(conn) == [(EVENTS_IN_TMOX,)]
    last = [line for line in audit_lines(state_dir) if line["rpc"] == "get_flight_info"][-1]
    assert last["sub"] == "alice" and last["outcome"] == "ok"


def test_adbc_wrong_password_and_rate_limit(location: str) -> None:
    import adbc_driver_manager

    for _ in range(5):
        with pytest.raises(adbc_driver_manager.Error, match="UNAUTHENTICATED") as info:
            adbc_connect(location, username="dave", password="not-the-password")
        assert "wrong user name or password" in str(info.value)
    with pytest.raises(adbc_driver_manager.Error, match="too many failed logins for 'dave'"):
        adbc_connect(location, username="dave", password=PASSWORD)


def test_adbc_authorization_header(location: str, auth_server: LclstreamServer,
                                   state_dir: Path, keys: Keys) -> None:
    good = own_token(auth_server, "adbc-user")
    with adbc_connect(location, **{"adbc.flight.sql.authorization_header": f"Bearer {good}"}) as c:
        assert adbc_query(c) == [(EVENTS_IN_TMOX,)]
    last = [line for line in audit_lines(state_dir) if line["rpc"] == "get_flight_info"][-1]
    assert last["sub"] == "adbc-user"
    now = int(time.time())
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad_tokens = {
        "garbage": "Bearer garbage",
        "malformed": "Token x",
        "expired": "Bearer " + institution_token(keys, iat=now - 7200, exp=now - 3600),
        "not yet valid": "Bearer " + institution_token(keys, nbf=now + 3600),
        "wrong signature": "Bearer " + jwt.encode(claims(), impostor, algorithm="RS256"),
        "wrong audience": "Bearer " + institution_token(keys, aud="someone-else"),
        "alg none": "Bearer " + jwt.encode(claims(), None, algorithm="none"),
        "unknown issuer": "Bearer " + institution_token(keys, iss="https://evil.example.com"),
        "oversized": f"Bearer {good}{'x' * 6500}",
    }
    for what, header in bad_tokens.items():
        with adbc_connect(location, **{"adbc.flight.sql.authorization_header": header}) as c:
            message = adbc_query_error(c)
        assert "UNAUTHENTICATED" in message, f"{what}: {message}"
