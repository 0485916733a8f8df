"""Write a planned request to Parquet or Arrow IPC, batch by batch, atomically.

Memory stays at about one batch whatever the run size, and the destination only ever holds a
complete file: data goes to a temporary file beside it that is renamed when the last batch is in.

A `download` can be resumed: the batches received so far are kept in `.NAME.partial/` beside
the output (Arrow IPC segments, one per endpoint and attempt) with `state.json`, the plan's
sealed tickets and how far each endpoint got, saved after every batch. Run again with
`resume=True` (`lclstream get --resume`), it asks each endpoint only for the events it lacks.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from clients.client import Client, locations, progress_bar

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow",
           ".ipc": "arrow"}


def _writer(kind: str, sink: str, schema: pa.Schema):
    if kind == "parquet":
        return pq.ParquetWriter(sink, schema, compression="zstd")
    return ipc.new_file(sink, schema)


def _format(output: Path) -> str:
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise ValueError(f"unknown output format '{output.suffix}'; use one of "
                         f"{', '.join(sorted(FORMATS))}")
    return kind


def write_batches(schema: pa.Schema, batches: Iterable[pa.RecordBatch], output: Path,
                  bar: Any = None) -> int:
    """Write batches to `output` (format from its suffix), atomically; returns the rows."""
    kind = _format(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(fd)
    rows = 0
    try:
        writer = _writer(kind, tmp, schema)
        try:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
                if bar is not None:
                    bar.update(batch.nbytes)
        finally:
            writer.close()
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rows


STATE = "state.json"


class PartialMismatch(ValueError):
    """A partial download of another request is in the way."""


def download(client: Client, info: flight.FlightInfo, request: bytes, output: Path,
             resume: bool = False, progress: bool = True) -> int:
    """Fetch every endpoint of `info` (planned from `request`) into `output`, keeping what
    arrives in `.NAME.partial/` so that a download cut short continues with `resume=True`
    from the first event it lacks; returns the events written."""
    _format(output)  # an unknown format fails now, not after the download
    partial = output.parent / f".{output.name}.partial"
    state = _load(partial, request) if resume else None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = {"v": 1, "request": request.decode(), "endpoints": [
            {"ticket": base64.b64encode(e.ticket.ticket).decode(), "next": None,
             "locations": locations(e), "done": False, "segments": []}
            for e in info.endpoints]}
        _save(partial, state)
    bar = progress_bar(info.total_bytes, output.name) if progress else None
    try:
        for k, endpoint in enumerate(state["endpoints"]):
            if not endpoint["done"]:
                _fetch(client, partial, state, k, bar)
        rows = write_batches(info.schema, _kept(partial, state), output)
    finally:
        if bar is not None:
            bar.close()
    shutil.rmtree(partial)
    return rows


def _fetch(client: Client, partial: Path, state: dict, k: int, bar: Any) -> None:
    endpoint = state["endpoints"][k]
    ticket = flight.Ticket(base64.b64decode(endpoint["ticket"]))
    locations = [flight.Location(uri) for uri in endpoint.get("locations", [])]
    reader = client.endpoint_reader(flight.FlightEndpoint(ticket, locations),
                                    start_from=endpoint["next"])
    name = f"e{k:05d}-{len(endpoint['segments']):03d}.arrow"
    segment = [name, 0]  # the batches of this attempt that are safely on disk
    writer = sink = None
    try:
        for batch in reader:
            if writer is None:
                sink = open(partial / name, "wb")
                writer = ipc.new_stream(sink, batch.schema)
                endpoint["segments"].append(segment)
            writer.write_batch(batch)
            sink.flush()
            os.fsync(sink.fileno())  # on disk before the state counts it
            segment[1] += 1
            endpoint["next"] = reader.next_event
            _save(partial, state)
            if bar is not None:
                bar.update(batch.nbytes)
    finally:
        if writer is not None:
            writer.close()
            sink.close()
    endpoint["done"] = True
    _save(partial, state)


def _kept(partial: Path, state: dict) -> Iterator[pa.RecordBatch]:
    """The batches the state vouches for, in order (a batch half-written when the download
    was cut is beyond its segment's count and is skipped)."""
    for endpoint in state["endpoints"]:
        for name, count in endpoint["segments"]:
            with ipc.open_stream(str(partial / name)) as reader:
                for _ in range(count):
                    yield reader.read_next_batch()


def _load(partial: Path, request: bytes) -> dict | None:
    try:
        state = json.loads((partial / STATE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("request") != request.decode():
        raise PartialMismatch(
            f"{partial} holds a partial download of another request; delete it, or run "
            "without --resume to start over")
    return state


def _save(partial: Path, state: dict) -> None:
    """state.json, replaced atomically and durably: a download cut at any moment resumes from
    what it says."""
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=partial)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, partial / STATE)
