"""The simulated acquisition (`flight_server.generator.simulator`), `lclstream produce |
streams`, and the demo's live stream: a real server on loopback with a data root of its own
for the streams."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from clients import Client, connect
from flight_server.cli import DemoAcquisition, main
from flight_server.config import Settings
from flight_server.generator import physics as ph
from flight_server.generator.simulator import SEGMENT_EVENTS, Simulator, event_schema, produce
from flight_server.security.assembly import minter_for
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from schemas import metadata as md
from tests.helpers import LCLS2_EXP, start_server

NS = 1_000_000_000


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LclstreamServer]:
    srv = start_server(tmp_path_factory.mktemp("live-data"))
    yield srv
    srv.shutdown()


@pytest.fixture
def live(live_server: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{live_server.port}") as c:
        yield c


def location(server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


def token(subject: str, grants: Grants) -> str:
    minter = minter_for(Settings(state_dir=Path(os.environ["LCLSTREAM_STATE_DIR"])))
    return minter.mint(subject, grants, 600)


def unpack_lcls2(raw: np.ndarray) -> np.ndarray:
    """LCLS2 raw time -> Unix ns."""
    return ((raw >> 32) + ph.UNIX_AT_1990) * NS + (raw & 0xFFFFFFFF)


def receive(client: Client, stream: str, events: int) -> pa.Table:
    """The first `events` events of a live stream (it may still be growing)."""
    batches, got = [], 0
    with client.subscribe(LCLS2_EXP, stream) as sub:
        for batch in sub:
            batches.append(batch)
            got += batch.num_rows
            if got >= events:
                break
    return pa.Table.from_batches(batches)


# -- the simulator -------------------------------------------------------------------------------


def test_simulated_events_have_the_demo_runs_columns(client: Client) -> None:
    """Same names, order, types and field metadata (units, detector, path, fill value) as the
    server gives a generated LCLS2 run, less the derived `run`."""
    served = client.schema(LCLS2_EXP, 7)
    served = served.remove(served.get_field_index(md.RUN_COLUMN))
    batch = Simulator(seed=1).batch(6)
    assert batch.schema.equals(event_schema())
    assert batch.schema.names == served.names
    for got, want in zip(batch.schema, served, strict=True):
        assert got.type == want.type, got.name
        assert got.metadata == want.metadata, got.name
    assert batch.schema.field("gmd/energy").metadata[md.UNITS] == b"mJ"
    assert batch.schema.field("ebeam/photon_energy").metadata[md.UNITS] == b"eV"


def test_timestamps_are_lcls2_times_of_now() -> None:
    sim = Simulator(seed=2, rate=120.0)
    before = time.time_ns()
    batch = sim.batch(24)
    after = time.time_ns()
    raw = batch.column("timestamp").to_numpy()
    unix = unpack_lcls2(raw)
    assert raw.dtype == np.int64
    assert (raw & 0xFFFFFFFF).max() < NS  # the low word is nanoseconds
    np.testing.assert_array_equal(unix, batch.column("time").cast(pa.int64()).to_numpy())
    assert before - NS <= unix[0] and unix[-1] <= after  # the last shot is now
    assert np.all(np.abs(np.diff(unix) - NS / 120) <= 1)  # 120 Hz apart
    assert batch.column("time").type == pa.timestamp("ns", tz="UTC")


def test_events_are_physical_and_keep_varying() -> None:
    sim = Simulator(seed=3)
    first = sim.batch(SEGMENT_EVENTS + 600)  # crosses into a second segment
    assert first.num_rows == SEGMENT_EVENTS + 600
    energy = first.column("gmd/energy")
    assert 0 < energy.null_count < 0.05 * len(energy)  # a diagnostic misses a few shots
    assert 1.2 < pc.mean(energy).as_py() < 1.8
    assert first.column("evr/code_40").null_count > 0
    frames = first.column("pnccd/image")
    assert frames.type.value_type == pa.uint16() and list(frames.type.shape) == [1, 128, 128]
    n_peaks = pc.list_value_length(first.column("peaks/var_x")).to_numpy()
    assert n_peaks.max() >= 5 and (n_peaks == 0).any()
    same = pc.list_value_length(first.column("peaks/var_intensity")).to_numpy()
    np.testing.assert_array_equal(n_peaks, same)
    # The second segment is new beam, not the first one again.
    a = energy.slice(0, 600).to_numpy(zero_copy_only=False)
    b = energy.slice(SEGMENT_EVENTS, 600).to_numpy(zero_copy_only=False)
    assert not np.allclose(np.nan_to_num(a), np.nan_to_num(b))
    # Ion yields grow with the pulse energy of the same shot.
    waves = first.column("tof/waveforms").storage.flatten().to_numpy().reshape(-1, 2, 1024)
    ok = ~np.isnan(energy.to_numpy(zero_copy_only=False))
    n2 = waves[:, 0, 885:960].sum(axis=1)
    assert np.corrcoef(energy.to_numpy(zero_copy_only=False)[ok], n2[ok])[0, 1] > 0.8


def test_a_seed_repeats_the_values_not_the_times() -> None:
    a, b = Simulator(seed=4).batch(10, end_ns=10**18), Simulator(seed=4).batch(10)
    assert a.column("gmd/energy").equals(b.column("gmd/energy"))
    assert a.column("pnccd/image").equals(b.column("pnccd/image"))
    assert not a.column("time").equals(b.column("time"))
    assert not Simulator().batch(10).column("pnccd/image").equals(b.column("pnccd/image"))


# -- produce -------------------------------------------------------------------------------------


def test_produce_sends_the_events_at_the_rate(live: Client) -> None:
    reports: list[dict] = []
    summary = produce(live, LCLS2_EXP, "paced", rate=200.0, events=102, batch_events=4,
                      progress=lambda s: reports.append(dict(s)), progress_every=0.1)
    assert summary["events"] == 102 and summary["batches"] == 26  # the last batch has 2
    assert summary["seconds"] >= 0.9 * 102 / 200  # paced, not sent as fast as possible
    assert summary["next_offset"] == 102 and summary["run"] is None
    assert len(reports) >= 2 and 0 < reports[0]["events"] < reports[-1]["events"] <= 102
    stream = next(s for s in live.streams(LCLS2_EXP) if s["stream"] == "paced")
    assert stream["events"] == 102 and stream["live"] and stream["producers"] == 0
    table = receive(live, "paced", 102)
    assert table.num_rows == 102
    times = table.column("time").cast(pa.int64()).to_numpy()
    assert np.all(np.diff(times) > 0)  # one clock, no shot stamped twice


def test_produce_stops_on_an_event(live: Client) -> None:
    stop = threading.Event()
    threading.Timer(0.4, stop.set).start()
    summary = produce(live, LCLS2_EXP, "forever", rate=100.0, stop=stop)
    assert summary["stopped"] and summary["events"] > 0
    assert summary["next_offset"] == summary["events"]  # all of it stored before returning


def test_produce_refuses_bad_arguments(live: Client) -> None:
    for bad in ({"rate": 0}, {"batch_events": 0}, {"events": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            produce(live, LCLS2_EXP, "never", **bad)


# -- the command line ----------------------------------------------------------------------------


def test_cli_produce_end_run_makes_a_run(live_server: LclstreamServer, live: Client,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["produce", LCLS2_EXP, "cli-run", "--events", "60", "--rate", "600",
               "--batch-events", "6", "--end-run", "--server", location(live_server)])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = next(s for s in live.streams(LCLS2_EXP) if s["stream"] == "cli-run")["run"]
    assert "sent 60 events" in out and f"ended as run {run} of {LCLS2_EXP}" in out
    df = live.polars(LCLS2_EXP, run, columns=["time", "gmd/energy", "peaks/var_x"])
    assert df.height == 60 and df["gmd/energy"].mean() > 0
    schema = live.schema(LCLS2_EXP, run)
    assert schema.metadata[md.LAYOUT] == b"lcls2-smalldata"
    assert schema.metadata[md.EVENTS] == b"60"
    assert schema.field("pnccd/image").type == event_schema().field("pnccd/image").type
    config = schema.metadata[md.CONFIG].decode()
    assert "tof/sample_period_ns" in config  # the demo runs' configuration came along
    sql = live.sql(f'SELECT count(*) AS n FROM {LCLS2_EXP}.events WHERE run = ?', [run])
    assert sql.column("n").to_pylist() == [60]


def test_cli_streams_lists_streams_and_group_lag(live_server: LclstreamServer, live: Client,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    produce(live, LCLS2_EXP, "listed", rate=1000.0, events=30, batch_events=10)
    with live.subscribe(LCLS2_EXP, "listed", group="train") as sub:
        next(iter(sub))
        sub.commit()
    assert main(["streams", LCLS2_EXP, "--server", location(live_server)]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if " listed " in row)
    assert LCLS2_EXP in line and "true" in line and " 30 " in line
    assert "train: lag 20 (" in line  # members: 1 until the server sees the member leave
    assert main(["streams", "nosuchexp*", "--server", location(live_server)]) == 0
    assert "no live streams in nosuchexp*" in capsys.readouterr().out


def test_cli_produce_without_write_grant_fails_clearly(
        live_server: LclstreamServer, live: Client, capsys: pytest.CaptureFixture[str]) -> None:
    reader = token("reader", Grants.build(read=["*"]))
    rc = main(["produce", LCLS2_EXP, "forbidden", "--events", "24", "--rate", "240",
               "--server", location(live_server), "--token", reader])
    err = capsys.readouterr().err
    assert rc == 1
    assert "'reader' may not write experiment 'tmox42619'" in err
    assert "needs the `write` grant" in err and "Traceback" not in err
    assert all(s["stream"] != "forbidden" for s in live.streams())


# -- the demo's live stream ----------------------------------------------------------------------


def test_demo_acquisition_streams_with_a_write_only_token_and_stops(
        live_server: LclstreamServer, live: Client) -> None:
    acquisition = DemoAcquisition(stream="demo-live", rate=240.0, retention_bytes=64 << 20)
    shown = acquisition.start(live_server, location(live_server))
    try:
        assert shown["stream"] == "demo-live" and shown["retention"] == "64 MiB"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [s for s in live.streams(LCLS2_EXP) if s["stream"] == "demo-live"]
            if found and found[0]["events"] >= 24:
                break
            time.sleep(0.05)
        assert found and found[0]["producers"] == 1
        assert found[0]["retention"]["bytes"] == 64 << 20
        assert receive(live, "demo-live", 24).num_rows >= 24
    finally:
        acquisition.stop()
    assert not acquisition._thread.is_alive()
    stream = next(s for s in live.streams(LCLS2_EXP) if s["stream"] == "demo-live")
    assert stream["producers"] == 0 and stream["live"]
    # The next demo goes on in the same stream, unless it has become a run.
    assert DemoAcquisition(stream="demo-live")._free_stream(live_server) == "demo-live"
    live.end_run(LCLS2_EXP, "demo-live")
    assert DemoAcquisition(stream="demo-live")._free_stream(live_server) == "demo-live-2"
