"""Grants in the shapes tokens carry them, and the password store's hashing and throttling."""

from __future__ import annotations

from pathlib import Path

import pytest

from flight_server.security.grants import GrantError, Grants
from flight_server.security.users import LoginThrottle, UsersFile, check_password, hash_password


@pytest.mark.parametrize("claim", [
    {"read": ["tmox4*"], "write": ["xppd7114"]},
    {"read": "tmox4*", "write": ["xppd7114"]},
    "openid email read:tmox4* write:xppd7114",
    ["read:tmox4*", "write:xppd7114", "profile"],
])
def test_grant_shapes(claim) -> None:
    g = Grants.from_claim(claim)
    assert g.allows("tmox42619", "read") and not g.allows("tmox42619", "write")
    assert g.allows("xppd7114", "write") and not g.allows("xppd7114", "read")
    assert not g.allows("cxilu9218", "read")


def test_admin_implies_read_and_write_and_globs_stay_in_their_name() -> None:
    g = Grants.build(admin=["cxi*"], read=["tmo[xy]4?619"])
    assert g.allows("cxilu9218", "read") and g.allows("cxilu9218", "write")
    assert g.allows("tmox42619", "read") and g.allows("tmoy41619", "read")
    assert not g.allows("tmoz42619", "read") and not g.allows("tmox42619x", "read")
    assert not Grants().allows("anything", "read")
    assert Grants.from_claim(None) == Grants()


@pytest.mark.parametrize("claim", [{"delete": ["*"]}, {"read": [1]}, {"read": ["../x"]},
                                   {"read": ["a/b"]}, 42, {"read": {"x": 1}}])
def test_malformed_grants(claim) -> None:
    with pytest.raises(GrantError):
        Grants.from_claim(claim)


def test_password_hashes_are_salted_and_checked(tmp_path: Path) -> None:
    a, b = hash_password("same password"), hash_password("same password")
    assert a != b and check_password("same password", a) and check_password("same password", b)
    assert not check_password("other", a) and not check_password("x", "not-a-hash")
    users = UsersFile(tmp_path / "users.json")
    users.add("alice", "long enough", Grants.build(read=["x*"]))
    assert users.verify("alice", "long enough").grants.allows("x1", "read")
    assert users.verify("alice", "wrong") is None and users.verify("nobody", "x") is None
    with pytest.raises(ValueError, match="invalid user name"):
        users.add("../alice", "long enough", Grants())


def test_throttle_locks_a_name_for_the_window() -> None:
    t = LoginThrottle(max_failures=3, window=0.2)
    for _ in range(3):
        assert t.retry_after("alice") == 0
        t.failed("alice")
    assert 0 < t.retry_after("alice") <= 0.2
    assert t.retry_after("bob") == 0
    import time

    time.sleep(0.25)
    assert t.retry_after("alice") == 0


def test_verified_tokens_are_cached_until_they_expire() -> None:
    import time

    from flight_server.security.policy import Unauthenticated
    from flight_server.security.tokens import TokenMinter, TokenVerifier

    minter = TokenMinter("lclstream", "lclstream", "HS256", b"k" * 32, ttl=600)
    verifier = TokenVerifier([minter.verifying_issuer()], leeway=0)
    token = minter.mint("alice", Grants.build(read=["x"]))
    assert verifier.verify(token) is verifier.verify(token)  # the second from the cache
    short = minter.mint("alice", Grants.build(read=["x"]), ttl=1)
    verifier.verify(short)
    time.sleep(1.1)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(short)  # a cached token still expires on time


def test_eddsa_signed_server_tokens(tmp_path: Path) -> None:
    from flight_server.security import keys as state
    from flight_server.security.tokens import TokenMinter, TokenVerifier

    key = state.signing_key(tmp_path, "EdDSA")
    assert key.startswith(b"-----BEGIN PRIVATE KEY")
    assert state.signing_key(tmp_path, "EdDSA") == key  # kept, not regenerated
    minter = TokenMinter("lclstream", "lclstream", "EdDSA", key, ttl=60)
    identity = TokenVerifier([minter.verifying_issuer()]).verify(
        minter.mint("bob", Grants.build(write=["tmo*"])))
    assert identity.subject == "bob" and identity.may("tmox1", "write")
