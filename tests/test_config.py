"""Settings precedence: defaults < TOML file < LCLSTREAM_* environment < CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from flight_server import config


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "lclstream.toml"
    toml.write_text('[server]\nport = 9000\nbatch_bytes = 1000\ndata = "/from/file"\n')
    env = {"LCLSTREAM_PORT": "9100", "LCLSTREAM_PARTITION_BYTES": "5000"}
    s = config.load(toml, {"port": 9200, "host": None}, environ=env)
    assert s.port == 9200  # flag beats environment and file
    assert s.partition_bytes == 5000  # environment beats default
    assert s.batch_bytes == 1000 and s.data == Path("/from/file")  # file beats default
    assert s.host == "127.0.0.1"  # an unset flag does not override


def test_bad_settings_are_reported(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown settings.*prot"):
        config.load(toml, environ={})
    with pytest.raises(ValueError, match="setting 'port' must be int"):
        config.load(None, environ={"LCLSTREAM_PORT": "eighty"})


def test_security_settings_from_file_and_environment(tmp_path: Path) -> None:
    """An institution's issuer is configured in the settings file; key files are found next to
    it; booleans read as people write them."""
    toml = tmp_path / "lclstream.toml"
    toml.write_text(
        '[server]\ntls_cert = "certs/server.pem"\n\n'
        '[[issuer]]\nname = "https://id.example.edu"\nalgorithms = ["RS256"]\n'
        'public_key_file = "keys/idp.pem"\ngrants_claim = "scope"\n'
    )
    s = config.load(toml, environ={"LCLSTREAM_AUTH": "off", "LCLSTREAM_LEEWAY": "5"})
    assert s.auth is False and s.leeway == 5 and s.tls and s.location().startswith("grpc+tls://")
    (issuer,) = s.issuers
    assert issuer["public_key_file"] == str(tmp_path / "keys" / "idp.pem")
    assert s.state_path() == s.data / ".lclstream"
    assert s.users_path() == s.data / ".lclstream" / "users.json"
    with pytest.raises(ValueError, match="setting 'auth' must be bool"):
        config.load(None, environ={"LCLSTREAM_AUTH": "maybe"})


def test_issuer_misconfigurations_are_refused(tmp_path: Path) -> None:
    from flight_server.security.tokens import Issuer

    pem = tmp_path / "k.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    cases = [
        ({"name": "x", "algorithms": ["HS256"], "public_key_file": str(pem)}, "HS\\* algorithms"),
        ({"name": "x", "algorithms": ["RS256"], "secret": "s"}, "only HS256"),
        ({"name": "x", "algorithms": ["none"], "secret": "s"}, "'none' is never accepted"),
        ({"name": "x", "algorithms": [], "secret": "s"}, "at least one"),
        ({"name": "x", "algorithms": ["RS256"]}, "exactly one of"),
        ({"algorithms": ["RS256"], "public_key_file": str(pem)}, "needs 'name'"),
        ({"name": "x", "algorithms": ["RS256"], "public_key_file": str(pem), "colour": 1},
         "unknown issuer settings"),
    ]
    for table, phrase in cases:
        with pytest.raises(ValueError, match=phrase):
            Issuer.from_config(table, "lclstream")
