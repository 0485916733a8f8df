"""Clients that go away mid-stream free their file handles, threads and memory."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import psutil
import pyarrow.flight as flight
import pytest

from flight_server.generator import generate_lcls2_run
from tests.helpers import raw_client, start_server


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("big")
    # ~48 MiB of frames; 64 KiB batches -> hundreds of batches per stream
    generate_lcls2_run(root / "exp" / "exp_Run0001.h5", 1, n_events=1200, seed=1,
                       frame_shape=(128, 128))
    srv = start_server(root, batch_bytes=64 * 1024, first_batch_bytes=64 * 1024,
                       partition_bytes=1 << 40)
    yield srv, root
    srv.shutdown()


def open_run_files(root: Path) -> list[str]:
    return [f.path for f in psutil.Process().open_files() if f.path.startswith(str(root))]


def settle(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_aborted_streams_release_files_threads_and_memory(big_server) -> None:
    srv, root = big_server
    loc = f"grpc://127.0.0.1:{srv.port}"
    proc = psutil.Process()
    c = raw_client(loc)
    [endpoint] = c.get_flight_info(flight.FlightDescriptor.for_path("exp", "1")).endpoints
    c.do_get(endpoint.ticket).read_all()  # warm up: caches, gRPC pools, the run's file handle
    run = srv.catalog.run("exp", 1)
    assert settle(lambda: run._users == 0)
    files_before = open_run_files(root)
    assert len(files_before) <= 2  # the run's shared HDF5 handle (+ its plain descriptor)
    fds_before, rss_before = proc.num_fds(), proc.memory_info().rss

    for i in range(40):
        if i % 2:  # cancel the stream and keep the connection
            reader = c.do_get(endpoint.ticket)
            reader.read_chunk()
            reader.cancel()
        else:  # drop the whole connection mid-stream
            other = raw_client(loc)
            reader = other.do_get(endpoint.ticket)
            reader.read_chunk()
            other.close()
        del reader

    assert settle(lambda: run._users == 0), run._users  # every aborted stream let go
    assert open_run_files(root) == files_before  # no handle per stream
    assert len(srv.read_pool._threads) <= srv.settings.read_threads  # no thread per stream
    assert settle(lambda: proc.num_fds() <= fds_before + 4), (fds_before, proc.num_fds())
    # 40 streams of 48 MiB would be ~2 GiB if kept; allow allocator noise only
    assert proc.memory_info().rss - rss_before < 200 * 1024 * 1024

    # normal service afterwards
    table = c.do_get(endpoint.ticket).read_all()
    assert table.num_rows == 1200
    c.close()


def test_server_memory_is_bounded_by_batches_not_run_size(big_server) -> None:
    srv, root = big_server
    c = raw_client(srv.port)
    [endpoint] = c.get_flight_info(flight.FlightDescriptor.for_path("exp", "1")).endpoints
    # a slow consumer: the server may read ahead only `prefetch` batches, not the whole run
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    reader = c.do_get(endpoint.ticket)
    first = reader.read_chunk().data
    time.sleep(0.5)
    grown = psutil.Process().memory_info().rss - rss_before
    assert grown < 16 * 1024 * 1024, grown  # batches + gRPC window, not the 48 MiB run
    rows = first.num_rows + sum(chunk.data.num_rows for chunk in reader)
    assert rows == 1200
    c.close()


def test_shutdown_and_replaced_files_close_handles(tmp_path: Path) -> None:
    path = tmp_path / "exp" / "exp_Run0001.h5"
    generate_lcls2_run(path, 1, n_events=20)
    srv = start_server(tmp_path)
    c = raw_client(srv.port)
    read = lambda: sum(c.do_get(e.ticket).read_all().num_rows  # noqa: E731
                       for e in c.get_flight_info(flight.FlightDescriptor.for_path("exp", "1"))
                       .endpoints)
    assert read() == 20 and open_run_files(tmp_path)
    generate_lcls2_run(path, 1, n_events=30, seed=5)  # replaced in place
    assert read() == 30
    assert settle(lambda: len(open_run_files(tmp_path)) <= 2)  # the old handle was closed
    c.close()
    srv.shutdown()
    assert settle(lambda: not open_run_files(tmp_path))


def test_stream_dropped_before_its_first_batch_releases_the_run(big_server) -> None:
    from flight_server.sources.streaming import BatchSizing, stream_batches

    srv, _ = big_server
    run = srv.catalog.run("exp", 1)
    assert settle(lambda: run._users == 0)
    batches = stream_batches(run, run.resolve(["gmd/energy"]), 0, 10, 1, BatchSizing(),
                             srv.read_pool)
    assert run._users == 1
    del batches  # never iterated, as when a client goes away before the first batch
    assert settle(lambda: run._users == 0)
