"""A server answers only once every service is ready: before that, a client sees UNAVAILABLE (as
for a server not yet started) and resumes, never INTERNAL from a half-built server."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_server.live.log import SegmentLog
from tests.helpers import LCLSTREAM, cli_env, free_port, raw_client

EXP = "tmox42619"
ENTRIES = 200_000  # about a second of recovery at start: the window the old server answered in


def write_large_stream(root: Path) -> None:
    log = SegmentLog(root / EXP / "live" / "big" / "segments", 64 << 20)
    batch = pa.record_batch({"gmd/energy": pa.array([1.0])})
    log.create(batch.schema)
    for _ in range(ENTRIES):
        log.publish(log.append(batch, None, None))
    log.close()


@pytest.mark.slow
def test_calls_during_startup_are_unavailable_never_internal(tmp_path: Path) -> None:
    write_large_stream(tmp_path / "data")
    port = free_port()
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(tmp_path / "data"),
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "server.log").open("w"), env=cli_env())
    seen: list[str] = []
    try:
        client = raw_client(port)
        options = flight.FlightCallOptions(timeout=5)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                results = list(client.do_action(flight.Action("streams", b"{}"), options))
                break
            except flight.FlightUnavailableError:
                seen.append("unavailable")
            except flight.FlightError as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.002)
        else:
            pytest.fail("the server never became ready")
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "unavailable" in seen, "the test must catch the server while it starts"
    assert set(seen) == {"unavailable"}, [s for s in seen if s != "unavailable"][:3]
    (stream,) = json.loads(results[0].body.to_pybytes())
    assert (stream["stream"], stream["events"]) == ("big", ENTRIES)
