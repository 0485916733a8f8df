"""Narrowed tokens for delegation (`narrow_token`, `Client.narrow_token`, `lclstream token
narrow`), against a real server: a narrowed token holds only grants its caller's cover, never
outlives its caller's, and can be narrowed again but never widened."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import connect
from flight_server.security.delegation import covers
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import CXI_EXP, LCLS1_EXP, LCLS2_EXP, raw_client, run_cli, start_server

DENIED, INVALID = flight.FlightUnauthorizedError, pa.ArrowInvalid
INSTITUTION = "https://id.example.edu"
INSTITUTION_SECRET = "an institution's shared secret, 32 bytes or more"


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("narrow-audit") / "audit.log"


@pytest.fixture(scope="module")
def narrow_server(data_root: Path, audit_file: Path) -> Iterator[LclstreamServer]:
    issuers = ({"name": INSTITUTION, "algorithms": ["HS256"], "secret": INSTITUTION_SECRET},)
    srv = start_server(data_root, issuers=issuers, audit_log=audit_file)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def location(narrow_server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{narrow_server.port}"


def token_for(server: LclstreamServer, subject: str = "alice", ttl: float = 3600,
              job: str | None = None, **grants: tuple[str, ...]) -> str:
    """A token of the server's own issuer: token_for(srv, "bob", read=("cxi*",))."""
    return server.security.minter.mint(subject, Grants(**grants), ttl, job=job)


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def narrow(location: str, token: str, body: dict | bytes) -> dict:
    """The raw action, as any Flight client would send it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    client = raw_client(location, token)
    try:
        return json.loads(list(client.do_action(flight.Action("narrow_token", raw)))[0]
                          .body.to_pybytes())
    finally:
        client.close()


def test_narrowed_token_reads_exactly_the_narrowed_experiment(
        location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*", "xpp*"))
    with connect(location, caller) as c:
        assert sorted(c.experiments()) == sorted([LCLS2_EXP, LCLS1_EXP])
        token = c.narrow_token(read=LCLS2_EXP, ttl=600)
    with connect(location, token) as c:
        assert c.experiments() == [LCLS2_EXP]
        assert c.read(LCLS2_EXP, 7, ["gmd/energy"]).num_rows == 120
        who = c.whoami()
        assert who["subject"] == "alice" and who["grants"] == {"read": [LCLS2_EXP]}
        with pytest.raises(DENIED, match=f"'alice' may not read experiment '{LCLS1_EXP}'"):
            c.read(LCLS1_EXP, 3, ["gmd/energy"])
        with pytest.raises(DENIED):
            c.read(CXI_EXP, 12)


def test_expiry_is_never_later_than_the_caller_nor_now_plus_ttl(
        location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*",), ttl=1800)
    caller_exp = claims(caller)["exp"]
    before = int(time.time())
    short = narrow(location, caller, {"grants": {"read": [LCLS2_EXP]}, "ttl": 60})
    assert claims(short["token"])["exp"] == short["expires"]
    assert short["expires"] <= min(caller_exp, int(time.time()) + 60)
    assert short["expires"] >= before + 60
    assert short["subject"] == "alice" and short["grants"] == {"read": [LCLS2_EXP]}
    # A longer ttl, or none (the server's token_ttl, 8 h), is cut to the caller's expiry.
    for body in ({"grants": {"read": [LCLS2_EXP]}, "ttl": 7 * 86400},
                 {"grants": {"read": [LCLS2_EXP]}}):
        reply = narrow(location, caller, body)
        assert reply["expires"] == caller_exp
        assert claims(reply["token"])["iss"] == claims(caller)["iss"]


def test_write_without_the_write_grant_is_refused(location: str,
                                                   narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*",))
    with connect(location, caller) as c:
        with pytest.raises(DENIED, match=rf"may not delegate write {LCLS2_EXP}.*"
                                         r"caller holds: read tmox4\*"):
            c.narrow_token(read=LCLS2_EXP, write=LCLS2_EXP)
        with pytest.raises(DENIED, match=f"may not delegate admin {LCLS2_EXP}"):
            c.narrow_token(admin=LCLS2_EXP)


def test_globs_are_covered_only_as_held(location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*",), write=(LCLS2_EXP,))
    with connect(location, caller) as c:
        for wider in ("tmox*", "*", "tmo?4*", "[t]mox4*", "tmox42*"):  # the last is narrower,
            with pytest.raises(DENIED, match=r"may not delegate read"):  # but not held as such
                c.narrow_token(read=wider)
        with pytest.raises(DENIED, match=r"may not delegate write tmox4\*"):
            c.narrow_token(write="tmox4*")  # held for read, not for write
        assert claims(c.narrow_token(read="tmox4*"))["grants"] == {"read": ["tmox4*"]}
        # A name inside the caller's glob is covered, and so is one held literally.
        got = claims(c.narrow_token(read=["tmox42619", "tmox4-other"], write=LCLS2_EXP))
        assert got["grants"] == {"read": ["tmox42619", "tmox4-other"], "write": [LCLS2_EXP]}
    star = token_for(narrow_server, read=("*",))
    with connect(location, star) as c:
        assert claims(c.narrow_token(read=["tmox*", "xpp?7114"]))["grants"] == {
            "read": ["tmox*", "xpp?7114"]}
        with pytest.raises(DENIED, match="may not delegate write"):
            c.narrow_token(write="tmox*")


def test_admin_implies_read_and_write(location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, admin=("tmox4*",))
    with connect(location, caller) as c:
        token = c.narrow_token(read="tmox4*", write=LCLS2_EXP, admin=LCLS2_EXP)
        assert claims(token)["grants"] == {"read": ["tmox4*"], "write": [LCLS2_EXP],
                                           "admin": [LCLS2_EXP]}
        with pytest.raises(DENIED, match="may not delegate read xpp"):
            c.narrow_token(read="xpp*")
    # read and write together are not admin
    both = token_for(narrow_server, read=(LCLS2_EXP,), write=(LCLS2_EXP,))
    with connect(location, both) as c, pytest.raises(DENIED, match="may not delegate admin"):
        c.narrow_token(admin=LCLS2_EXP)


def test_a_narrowed_token_narrows_further_but_never_widens(
        location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*", "xpp*"), write=(LCLS2_EXP,))
    with connect(location, caller) as c:
        first = c.narrow_token(read=LCLS2_EXP, write=LCLS2_EXP, ttl=900)
    with connect(location, first) as c:
        second = c.narrow_token(read=LCLS2_EXP, ttl=3600)
        for wider in ({"read": "tmox4*"}, {"read": LCLS1_EXP}, {"admin": LCLS2_EXP}):
            with pytest.raises(DENIED, match="may not delegate"):
                c.narrow_token(**wider)
    assert claims(second)["grants"] == {"read": [LCLS2_EXP]}
    assert claims(second)["exp"] <= claims(first)["exp"]  # 3600 asked, 900 left at most
    with connect(location, second) as c:
        assert c.experiments() == [LCLS2_EXP]
        with pytest.raises(DENIED, match=f"may not delegate write {LCLS2_EXP}"):
            c.narrow_token(write=LCLS2_EXP)


def test_scope_shapes_are_accepted(location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*",), write=(LCLS2_EXP,))
    for grants in (f"read:{LCLS2_EXP}  write:{LCLS2_EXP}", [f"read:{LCLS2_EXP}",
                                                             f"write:{LCLS2_EXP}"]):
        reply = narrow(location, caller, {"grants": grants, "ttl": 60})
        assert reply["grants"] == {"read": [LCLS2_EXP], "write": [LCLS2_EXP]}
    with pytest.raises(DENIED, match="may not delegate read xpp"):
        narrow(location, caller, {"grants": "read:xpp*"})


def test_a_job_token_cannot_narrow(location: str, narrow_server: LclstreamServer) -> None:
    job = token_for(narrow_server, read=("tmox4*",), write=(LCLS2_EXP,), job="0" * 32)
    with pytest.raises(DENIED, match="job's token"):
        narrow(location, job, {"grants": {"read": [LCLS2_EXP]}})


def test_only_this_servers_own_tokens_narrow(location: str) -> None:
    now = int(time.time())
    foreign = jwt.encode({"iss": INSTITUTION, "aud": "lclstream", "sub": "alice", "iat": now,
                          "exp": now + 600, "grants": {"read": ["tmox4*"]}},
                         INSTITUTION_SECRET, algorithm="HS256")
    with connect(location, foreign) as c:
        assert c.experiments() == [LCLS2_EXP]  # the institution's token is good for reading
        with pytest.raises(DENIED, match=f"only this server's own tokens.*'{INSTITUTION}'"):
            c.narrow_token(read=LCLS2_EXP)


def test_a_token_in_its_leeway_is_not_narrowed(location: str,
                                               narrow_server: LclstreamServer) -> None:
    expired = token_for(narrow_server, read=("tmox4*",), ttl=-5)  # still within the leeway
    with pytest.raises(flight.FlightUnauthenticatedError, match="log in again"):
        narrow(location, expired, {"grants": {"read": [LCLS2_EXP]}})


MALFORMED = [
    (b"not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    ({}, "'grants' is a required property"),
    ({"grants": {"read": [LCLS2_EXP]}, "experiment": LCLS2_EXP}, "'experiment' was unexpected"),
    ({"grants": {"read": [LCLS2_EXP]}, "v": 1}, "'v' was unexpected"),
    ({"grants": {"raed": [LCLS2_EXP]}}, "'raed' was unexpected"),
    ({"grants": {"read": ["tmox/../x"]}}, "grants/read/0"),
    ({"grants": {"read": [""]}}, "grants/read/0"),
    ({"grants": {"read": ["a" * 200]}}, "grants/read/0"),
    ({"grants": {"read": [7]}}, "grants/read/0"),
    ({"grants": {"read": LCLS2_EXP}}, "grants"),
    ({"grants": "openid read:tmox42619"}, "scope 'openid' is not read:GLOB"),
    ({"grants": "read:tmox/x"}, "scope 'read:tmox/x'"),
    ({"grants": ["read:tmox42619", "email"]}, "grants"),
    ({"grants": 7}, "grants"),
    ({"grants": {}}, "asks for no grants"),
    ({"grants": {"read": [], "write": []}}, "asks for no grants"),
    ({"grants": []}, "asks for no grants"),
    ({"grants": "   "}, "asks for no grants"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": 0}, "ttl: 0 is less than the minimum of 1"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": -60}, "ttl: -60 is less than the minimum"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": 1.5}, "ttl: 1.5 is not of type 'integer'"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": 3600.0}, "ttl: 3600.0 is not of type 'integer'"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": "1h"}, "is not of type 'integer'"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": True}, "is not of type 'integer'"),
    ({"grants": {"read": [LCLS2_EXP]}, "ttl": 10**12}, "greater than the maximum of 31622400"),
    (b'{"grants": {"read": ["tmox42619"]}, "ttl": 1' + b"0" * 30 + b"}",
     "an integer of 31 digits"),
    (b'{"grants": {"read": ["tmox42619"]}, "ttl": NaN}', "NaN is not a JSON number"),
]


@pytest.mark.parametrize(("body", "words"), MALFORMED)
def test_malformed_bodies_are_invalid_argument(location: str, narrow_server: LclstreamServer,
                                               body: dict | bytes, words: str) -> None:
    caller = token_for(narrow_server, admin=("*",))  # refused for the form, not the grants
    with pytest.raises(INVALID) as refused:
        narrow(location, caller, body)
    assert words in str(refused.value)
    assert "Traceback" not in str(refused.value)


def test_narrowing_is_audited(location: str, narrow_server: LclstreamServer,
                              audit_file: Path) -> None:
    caller = token_for(narrow_server, "auditee", read=("tmox4*",))
    reply = narrow(location, caller, {"grants": {"read": [LCLS2_EXP]}, "ttl": 120})
    with pytest.raises(DENIED):
        narrow(location, caller, {"grants": {"read": ["xpp*"]}})
    lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
    mine = [line for line in lines if line["sub"] == "auditee" and line["rpc"] == "narrow_token"]
    ok, refused = mine[-2], mine[-1]
    assert ok["outcome"] == "ok" and ok["grants"] == f"read {LCLS2_EXP}"
    assert ok["expires"] == reply["expires"] and ok["token_id"] == claims(reply["token"])["jti"]
    assert ok["peer"].startswith("ipv4:127.0.0.1") and ok["iss"] == "lclstream"
    assert reply["token"] not in audit_file.read_text()  # the token itself is never logged
    assert refused["outcome"] == "permission_denied" and refused["grants"] == "read xpp*"
    assert "may not delegate read xpp*" in refused["error"]


def test_the_action_is_listed(location: str) -> None:
    client = raw_client(location)
    try:
        actions = {a.type: a.description for a in client.list_actions()}
    finally:
        client.close()
    assert "subset of your grants" in actions["narrow_token"]


def test_cli_token_narrow_prints_a_token_that_works(
        location: str, narrow_server: LclstreamServer) -> None:
    caller = token_for(narrow_server, read=("tmox4*", "xpp*"))
    res = run_cli("token", "narrow", "--server", location, "--token", caller,
                  "--read", LCLS2_EXP, "--ttl", "1h")
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert claims(token)["exp"] <= min(claims(caller)["exp"], int(time.time()) + 3600)
    listed = run_cli("ls", "--server", location, "--token", token)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [LCLS2_EXP]
    wider = run_cli("token", "narrow", "--server", location, "--token", caller,
                    "--write", LCLS2_EXP)
    assert wider.returncode == 1 and "may not delegate write" in wider.stderr
    assert "Traceback" not in wider.stderr and not wider.stdout.strip()
    empty = run_cli("token", "narrow", "--server", location, "--token", caller)
    assert empty.returncode == 1 and "without grants" in empty.stderr


def test_coverage_rules() -> None:
    held = Grants.build(read=["tmox4*", "cxi42"], write=["xpp1"], admin=["mfx*"])
    assert covers(held, "tmox42619", "read") and covers(held, "tmox4*", "read")
    assert not covers(held, "tmox42*", "read") and not covers(held, "tmox4*", "write")
    assert covers(held, "cxi42", "read") and not covers(held, "cxi4?", "read")
    assert covers(held, "mfx*", "read") and covers(held, "mfx*", "write")
    assert covers(held, "mfx*", "admin") and not covers(held, "xpp1", "admin")
    assert covers(held, "mfx1", "write") and not covers(held, "[m]fx1", "write")
    assert covers(Grants.build(admin=["*"]), "[a-z]*", "admin")


def test_a_server_without_authentication_has_no_tokens_to_narrow(data_root: Path) -> None:
    srv = start_server(data_root, auth=False)
    try:
        with pytest.raises(pa.ArrowNotImplementedError, match="--no-auth"):
            narrow(f"grpc://127.0.0.1:{srv.port}", "unused", {"grants": {"read": [LCLS2_EXP]}})
    finally:
        srv.shutdown()
