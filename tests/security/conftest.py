"""Hypothesis profiles for the fuzz targets (a bounded run in `make test` and CI, a long one in
`make fuzz`; HYPOTHESIS_PROFILE picks one, LCLSTREAM_FUZZ_EXAMPLES sizes the long run), and a
live server of its own for the tests that produce."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from flight_server.server import LclstreamServer
from tests.helpers import EXP, start_server

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=150, derandomize=True, **_COMMON)
settings.register_profile("fuzz", **_COMMON,
                          max_examples=int(os.environ.get("LCLSTREAM_FUZZ_EXAMPLES", "5000")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LclstreamServer]:
    """A server of its own for live streams, with a short sync interval."""
    (tmp_path / EXP).mkdir()
    srv = start_server(tmp_path, live_fsync_interval=0.01)
    yield srv
    srv.shutdown()
