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
