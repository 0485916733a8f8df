"""Plain helpers shared by test modules: constants, servers, clients, the CLI, test data.

Fixtures live in conftest.py files; everything here is an ordinary function or constant, imported
as `from tests.helpers import ...`. The session's admin token and state directory come from the
environment (set by the `credentials_sandbox` fixture), so CLI subprocesses see the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
from adbc_driver_flightsql import DatabaseOptions

from clients.credentials import BearerToken
from flight_server.catalog import Catalog
from flight_server.config import Settings
from flight_server.processing import PROCESSING, build_pipeline
from flight_server.server import LclstreamServer

# -- the generated test data (see conftest.data_root) --------------------------------------------

LCLS2_EXP, LCLS1_EXP, CXI_EXP = "tmox42619", "xppd7114", "cxilu9218"


def open_h5(path: Path) -> h5py.File:
    """Open a run file to check what the server sent. Without locking, as the server opens it:
    HDF5 refuses a second handle on a file with a different locking flag in one process."""
    return h5py.File(path, "r", locking=False)


# -- servers and Flight clients ------------------------------------------------------------------


def admin_token() -> str:
    return os.environ["LCLSTREAM_TOKEN"]


def raw_client(port_or_location: int | str, token: str | None = None,
               **options) -> flight.FlightClient:
    """A bare pyarrow.flight client that sends a bearer token (the admin's by default)."""
    location = (port_or_location if isinstance(port_or_location, str)
                else f"grpc://127.0.0.1:{port_or_location}")
    return flight.connect(location, middleware=[BearerToken(token or admin_token())], **options)


def start_server(data: Path, **overrides) -> LclstreamServer:
    """A server on a free loopback port with the session's state directory (so the session's
    admin token is valid on it), with Settings fields overridden."""
    state_dir = Path(os.environ["LCLSTREAM_STATE_DIR"])
    # A job table per data root (servers of other roots must not run each other's jobs), kept
    # outside it (tests count the files open under a data root).
    root = hashlib.sha1(str(Path(data).resolve()).encode()).hexdigest()
    table = state_dir / "jobs" / f"{root}.sqlite"
    settings = replace(Settings(data=data, port=0, state_dir=state_dir, jobs_database=table),
                       **overrides)
    return LclstreamServer(settings)


def ticket_json(ticket: flight.Ticket) -> dict:
    """The JSON document inside a sealed ticket."""
    return json.loads(ticket.ticket.rpartition(b".")[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adbc(location: str, token: str | None = None, **db_kwargs):
    """An ADBC Flight SQL connection, with the admin's bearer token unless a token or a
    username is given."""
    if "username" not in db_kwargs:
        db_kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {token or admin_token()}"
    return dbapi.connect(location, db_kwargs=db_kwargs, autocommit=True)


# -- the `lclstream` command line as separate processes ------------------------------------------

LCLSTREAM = [sys.executable, "-m", "flight_server.cli"]


def cli_env(**changes: str | None) -> dict[str, str]:
    """The session's environment (its token and sandboxed keyring), with changes; None unsets."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: v for k, v in changes.items() if v}}
    return {k: v for k, v in env.items() if changes.get(k, "") is not None}


def run_cli(*args: str, timeout: float = 120, input: str | None = None,
            **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([*LCLSTREAM, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**env), input=input)


def interrupt(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process as Ctrl-C would; kill it if it has not stopped after `timeout` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(check, timeout: float = 60.0):
    """`check()`'s first true answer, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def wait_for_location(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        found = re.search(r"grpc://[\w.\[\]:]+:\d+", line)
        if found:
            return found.group(0)
    raise AssertionError(f"server printed no location; stderr: {proc.stderr.read()}")


# -- live streams ----------------------------------------------------------------------------------

EXP = "tmox42619"  # the experiment live-stream tests produce into


def events(start: int, n: int = 10, width: int = 64) -> pa.RecordBatch:
    """n events whose values say which events they are, so order and identity can be checked."""
    index = np.arange(start, start + n)
    waveforms = (index[:, None] * 1000 + np.arange(width)).astype(np.float32)
    return pa.record_batch({
        "timestamp": pa.array((index + (1_100_000_000 << 32)).astype(np.uint64)),
        "gmd/energy": pa.array(index * 0.5),
        "tof/waveforms": pa.FixedSizeListArray.from_arrays(pa.array(waveforms.ravel()), width),
        "peaks/var_x": pa.array([[float(i)] * (i % 3) for i in index], pa.list_(pa.float32())),
    })


def indices(batches: list[pa.RecordBatch]) -> list[int]:
    """The event indices of batches made by `events`, in order."""
    return [int(v * 2) for b in batches for v in b.column("gmd/energy").to_pylist()]


# -- processing steps ------------------------------------------------------------------------------

IMAGE, WAVES, ENERGY = "pnccd/image", "tof/waveforms", "gmd/energy"


def read_run(root: Path, experiment: str, number: int) -> pa.RecordBatch:
    """A whole run as one batch, read directly (no server)."""
    run = Catalog(root).run(experiment, number)
    with run.reader() as reader:
        return reader.read(list(run.columns.values()), 0, run.num_events)


def values(column: pa.Array) -> np.ndarray:
    """(events, *shape) values of an array column, nulls included (independent of the code
    under test)."""
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    t = column.type
    shape = list(t.shape) if isinstance(t, pa.FixedShapeTensorType) else [t.list_size]
    size = int(np.prod(shape))
    flat = storage.values.slice(storage.offset * size, len(storage) * size)
    return flat.to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def run_steps(batch: pa.RecordBatch, *steps: dict) -> pa.RecordBatch:
    pipeline = build_pipeline(list(steps), batch.schema)
    out = pipeline.apply(batch)
    assert out.schema.equals(pipeline.schema, check_metadata=True)
    out.validate(full=True)
    return out


def note(batch: pa.RecordBatch, name: str) -> str:
    return batch.schema.field(name).metadata[PROCESSING].decode()


def tensor_batch(data: np.ndarray, null: list[bool] | None = None, **scalars) -> pa.RecordBatch:
    """A one-tensor-column batch ("img") of the given (events, *shape) array, plus scalars."""
    flat = pa.array(data.reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(
        flat, int(np.prod(data.shape[1:])), mask=pa.array(null) if null else None)
    img = pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(flat.type, list(data.shape[1:])), storage)
    arrays = {"img": img, **{k: pa.array(v) for k, v in scalars.items()}}
    return pa.RecordBatch.from_pydict(arrays)
